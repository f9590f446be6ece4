from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sink import Sink


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis for the session; tests keep apart by key prefix."""
    with RedisServer(appendfsync="always") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink(name="sink-a") as server:
        yield server


@pytest.fixture
async def sink_b() -> AsyncIterator[Sink]:
    async with Sink(name="sink-b") as server:
        yield server
