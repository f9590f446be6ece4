"""Whether a Redis server can hold mail safely: a decision on its INFO replies. Pure.

DESIGN (Redis traps): Redis 6.2 or newer (XAUTOCLAIM); `maxmemory-policy noeviction`, or Redis
may evict queued mail; with `durability: fsync`, an append-only file to fsync.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smtpfleet.config import Durability

MIN_REDIS_VERSION = (6, 2, 0)  # XAUTOCLAIM
MIN_WAITAOF_VERSION = (7, 2, 0)  # WAITAOF, which durability: fsync waits on
SAFE_EVICTION_POLICY = "noeviction"


def server_version(server: Mapping[str, Any]) -> str:
    """What to log: Valkey's own version when it is Valkey, else the Redis version."""
    return str(server.get("valkey_version") or server.get("redis_version", "0"))


def unsuitable_reason(
    server: Mapping[str, Any],
    memory: Mapping[str, Any],
    persistence: Mapping[str, Any] | None,
    durability: Durability,
) -> str | None:
    """Why this server must not hold mail, or None. `persistence` is needed for fsync only."""
    compat = str(server.get("redis_version", "0"))  # Valkey reports its Redis compatibility here
    if _version_tuple(compat) < MIN_REDIS_VERSION:
        return f"Redis {compat} is too old: smtpfleet needs 6.2 or newer"
    policy = str(memory.get("maxmemory_policy", ""))
    if policy != SAFE_EVICTION_POLICY:
        return (
            f"Redis maxmemory-policy is {policy!r}: it may evict queued mail; "
            f"set maxmemory-policy {SAFE_EVICTION_POLICY}"
        )
    if durability is Durability.FSYNC:
        return _fsync_reason(compat, persistence)
    return None


def _fsync_reason(compat: str, persistence: Mapping[str, Any] | None) -> str | None:
    # Without WAITAOF every accept would wait for a confirmation that cannot come, and answer
    # 451 to all mail: refuse to start instead, saying why.
    if _version_tuple(compat) < MIN_WAITAOF_VERSION:
        return f"durability: fsync needs WAITAOF (Redis 7.2 or newer); this Redis is {compat}"
    if str((persistence or {}).get("aof_enabled")) != "1":
        return "durability: fsync needs appendonly yes on the Redis server"
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())
