"""The Redis suitability rule on plain INFO values (the real refusal is tested on Valkey in
tests/integration/test_durability.py)."""

from __future__ import annotations

import pytest

from smtpfleet.config import Durability
from smtpfleet.queue.suitability import server_version, unsuitable_reason

GOOD_SERVER = {"redis_version": "7.2.4", "valkey_version": "8.1.8"}
GOOD_MEMORY = {"maxmemory_policy": "noeviction"}


def test_a_recent_server_that_never_evicts_is_suitable() -> None:
    assert unsuitable_reason(GOOD_SERVER, GOOD_MEMORY, None, Durability.SERVER) is None
    assert server_version(GOOD_SERVER) == "8.1.8"
    assert server_version({"redis_version": "7.0.0"}) == "7.0.0"


@pytest.mark.parametrize("version", ["6.0.16", "5.0.0", "", "6.1.9"])
def test_a_server_older_than_6_2_is_refused(version: str) -> None:
    reason = unsuitable_reason({"redis_version": version}, GOOD_MEMORY, None, Durability.SERVER)
    assert reason is not None
    assert "too old" in reason


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "allkeys-random", ""])
def test_a_server_that_may_evict_is_refused(policy: str) -> None:
    reason = unsuitable_reason(
        GOOD_SERVER, {"maxmemory_policy": policy}, None, Durability.REPLICATED
    )
    assert reason is not None
    assert "noeviction" in reason


def test_fsync_durability_needs_an_append_only_file() -> None:
    off = {"aof_enabled": 0}
    assert unsuitable_reason(GOOD_SERVER, GOOD_MEMORY, off, Durability.FSYNC) is not None
    assert unsuitable_reason(GOOD_SERVER, GOOD_MEMORY, off, Durability.SERVER) is None
    on = {"aof_enabled": 1}
    assert unsuitable_reason(GOOD_SERVER, GOOD_MEMORY, on, Durability.FSYNC) is None


def test_fsync_durability_needs_waitaof() -> None:
    """Debian 12's Redis 7.0 would answer every accept with 451: refuse it at start."""
    aof = {"aof_enabled": 1}
    old = {"redis_version": "7.0.15"}
    reason = unsuitable_reason(old, GOOD_MEMORY, aof, Durability.FSYNC)
    assert reason is not None
    assert "WAITAOF" in reason
    assert unsuitable_reason(old, GOOD_MEMORY, aof, Durability.REPLICATED) is None
    assert unsuitable_reason(GOOD_SERVER, GOOD_MEMORY, aof, Durability.FSYNC) is None
