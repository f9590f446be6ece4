"""Which pool a node gets from its redis settings (no server needed: nothing connects yet)."""

from __future__ import annotations

import redis.asyncio as aioredis

from smtpfleet.config import RedisConfig
from smtpfleet.queue.connection import BlockingSentinelPool, connect


def test_a_url_gives_a_blocking_pool_with_the_credentials() -> None:
    config = RedisConfig(url="redis://db.internal:6380/3", password="s3cret", max_connections=7)
    connection = connect(config)
    pool = connection.client.connection_pool
    assert isinstance(pool, aioredis.BlockingConnectionPool)
    assert not isinstance(pool, BlockingSentinelPool)
    assert pool.max_connections == 7
    assert pool.connection_kwargs["host"] == "db.internal"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "s3cret"
    assert connection.sentinel is None


def test_sentinels_give_the_primary_of_the_named_set_with_waiting() -> None:
    config = RedisConfig(
        url="redis:///2",
        sentinels=["10.0.0.1:26379", "[::1]:26380"],
        master_name="mail",
        username="smtpfleet",
        password="data-secret",
        sentinel_password="sentinel-secret",
        max_connections=9,
    )
    connection = connect(config)
    pool = connection.client.connection_pool
    assert isinstance(pool, BlockingSentinelPool)
    assert isinstance(pool, aioredis.BlockingConnectionPool)  # waits rather than failing
    assert pool.service_name == "mail"
    assert pool.is_master
    assert pool.max_connections == 9
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["username"] == "smtpfleet"
    assert pool.connection_kwargs["password"] == "data-secret"
    assert connection.sentinel is not None
    addresses = [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in connection.sentinel.sentinels
    ]
    assert addresses == [("10.0.0.1", 26379), ("::1", 26380)]
    kwargs = connection.sentinel.sentinels[0].connection_pool.connection_kwargs
    assert kwargs["password"] == "sentinel-secret"


def test_a_password_in_the_url_reaches_the_sentinel_pool_too() -> None:
    config = RedisConfig(url="redis://mailer:p%40ss@primary/0", sentinels=["127.0.0.1:26379"])
    pool = connect(config).client.connection_pool
    assert pool.connection_kwargs["username"] == "mailer"
    assert pool.connection_kwargs["password"] == "p@ss"


def test_logs_name_the_sentinels_and_never_a_password() -> None:
    sentinel = RedisConfig(sentinels=["s1:26379", "s2:26379"], master_name="mail")
    assert sentinel.describe() == "sentinels s1:26379, s2:26379 (primary of 'mail')"
    assert RedisConfig(url="redis://u:secret@db:6379/0").describe() == "db:6379/0"
