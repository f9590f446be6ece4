"""Which pool a node gets from its redis settings (no server needed: nothing connects yet)."""

from __future__ import annotations

import ssl

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from smtpfleet.config import RedisConfig
from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.connection import BlockingSentinelPool, access_denied, connect


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


TLS = {"tls_ca_file": "/ca.pem", "tls_cert_file": "/client.pem", "tls_key_file": "/client.key"}
TLS_KWARGS = {
    "ssl_ca_certs": "/ca.pem",
    "ssl_certfile": "/client.pem",
    "ssl_keyfile": "/client.key",
}


def _subset(kwargs: dict[str, object]) -> dict[str, object]:
    return {key: kwargs.get(key) for key in TLS_KWARGS}


def test_rediss_verifies_against_the_ca_file_on_one_server() -> None:
    pool = connect(RedisConfig(url="rediss://db:6380/0", **TLS)).client.connection_pool
    assert issubclass(pool.connection_class, aioredis.SSLConnection)
    assert _subset(pool.connection_kwargs) == TLS_KWARGS


def test_rediss_verifies_against_the_ca_file_behind_sentinel() -> None:
    config = RedisConfig(url="rediss:///0", sentinels=["127.0.0.1:26379"], **TLS)
    pool = connect(config).client.connection_pool
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    assert _subset(pool.connection_kwargs) == TLS_KWARGS


def test_rediss_verifies_against_the_ca_file_on_every_cluster_node() -> None:
    """The cluster client once got ssl=True alone: the CA file and client certificate were
    dropped, so a private CA could never be verified."""
    config = RedisConfig(url="rediss://seed:7000/0", cluster=True, shards=64, **TLS)
    connection = connect(config)
    cluster = connection.client
    assert isinstance(cluster, RedisCluster)
    assert _subset(cluster.nodes_manager.connection_kwargs) == TLS_KWARGS
    assert connection.node_options is not None  # each primary's own client (queue/routes.py)
    assert issubclass(connection.node_options["connection_class"], aioredis.SSLConnection)
    assert _subset(connection.node_options) == TLS_KWARGS


ARGUMENTS: list[tuple[object, ...]] = [
    ("EVALSHA", "a" * 40, 2, "sf:{3}:s", b"sf:{3}:b", "body\x00\xff", b"\r\n\x00", 7, -3, 1.5, 0.1),
    ("SCRIPT LOAD", "return 1"),  # a command name of two words goes as two arguments
    (b"CLIENT SETINFO", "lib-name", "redis-py"),
    ("SET", "k", memoryview(b"view")),
    ("SET", "k", bytearray(b"array")),  # hiredis refuses it: redis-py's packer
    ("SET", "k", "é" * 2000),
]
LARGE = b"x" * 70_000  # above redis-py's buffer cutoff (6,000 bytes)


@pytest.mark.parametrize("url", ["redis://db:6379/0", "rediss://db:6380/0", "unix:///run/r.sock"])
def test_every_pool_packs_commands_with_hiredis_into_the_same_bytes(url: str) -> None:
    """redis-py's asyncio connection packs in Python (a few % of a node's CPU); ours
    through hiredis, byte for byte the same."""
    pool = connect(RedisConfig(url=url)).client.connection_pool
    ours = pool.connection_class(**pool.connection_kwargs)
    theirs = parse_url(url).get("connection_class", aioredis.Connection)(**pool.connection_kwargs)
    assert isinstance(ours, type(theirs))
    for args in ARGUMENTS:
        packed = ours.pack_command(*args)
        assert b"".join(packed) == b"".join(theirs.pack_command(*args)), args
        if not isinstance(args[-1], bytearray):
            assert len(packed) == 1  # hiredis's one buffer, not redis-py's chunks
    # A large value goes as it is, not copied into one buffer with the rest of its command
    # (hiredis would: a second copy of every large message while it is written).
    large = ours.pack_command("EVALSHA", "a" * 40, 1, "k", LARGE, 7)
    assert any(chunk is LARGE for chunk in large)
    assert b"".join(large) == b"".join(theirs.pack_command("EVALSHA", "a" * 40, 1, "k", LARGE, 7))
    for refused in (None, True):
        with pytest.raises(redis.exceptions.DataError):  # redis-py's own error, as before
            ours.pack_command("SET", "k", refused)


def test_sentinel_and_cluster_primaries_pack_with_hiredis_too() -> None:
    sentinel = connect(RedisConfig(sentinels=["127.0.0.1:26379"])).client.connection_pool
    cluster = connect(RedisConfig(url="redis://seed:7000/0", cluster=True, shards=64))
    assert cluster.node_options is not None
    for kind, base in (
        (sentinel.connection_class, SentinelManagedConnection),
        (cluster.node_options["connection_class"], aioredis.Connection),
    ):
        assert issubclass(kind, base)
        assert kind.pack_command is not base.pack_command


def _chained(error: BaseException) -> QueueUnavailable:
    wrapper = redis.exceptions.ConnectionError("Error 1 connecting to db:6380.")
    wrapper.__context__ = error
    unavailable = QueueUnavailable(f"redis: {wrapper}")
    unavailable.__cause__ = wrapper
    return unavailable


def test_access_denied_names_what_will_not_fix_itself() -> None:
    wrong_password = redis.exceptions.AuthenticationError("invalid username-password pair")
    assert "authentication refused" in (access_denied(_chained(wrong_password)) or "")
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert "not trusted (redis.tls_ca_file)" in (access_denied(_chained(untrusted)) or "")
    acl = redis.exceptions.NoPermissionError("this user has no permissions to run 'info'")
    assert "ACL user" in (access_denied(_chained(acl)) or "")
    refused = ConnectionRefusedError(111, "Connection refused")
    assert access_denied(_chained(refused)) is None  # Redis may still come: keep waiting
    assert access_denied(QueueUnavailable("timeout")) is None
