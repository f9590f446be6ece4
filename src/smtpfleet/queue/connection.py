"""How a node reaches Redis: one URL, or the primary of a Sentinel set, followed across failovers.

Both give a blocking pool: at its size a command waits for a free connection instead of failing
at once (redis-py's default pool raises "Too many connections", which under load turned good
accepts into 451s and finished deliveries into redeliveries).

With Sentinel, redis-py asks the Sentinels for the primary whenever a connection is made, and
a connection that meets `READONLY` (its server was demoted) disconnects, so the next command
reconnects to the new primary; until then our Redis boundary turns the errors into
`QueueUnavailable` (451 on accept, a pause in delivery).

`rediss://` means TLS on both paths, verified against `tls_ca_file` (or the system CAs), with a
client certificate when one is configured.

Every connection of the queue's pools packs its commands with hiredis (`packed`): redis-py's
asyncio connection packs them in Python, ~40 isinstance, len and encode calls per message, about
3 % of a node's CPU; its synchronous connection already uses hiredis for this. Commands that
carry a large value keep redis-py's packer, which does not copy it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis  # the redis[hiredis] extra: its reply parser, and here its packer
import redis.asyncio as aioredis
import redis.exceptions
from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.typing import EncodableT

from smtpfleet.config import RedisConfig, parse_hostport
from smtpfleet.config_tls import no_passphrase
from smtpfleet.queue.batcher import Confirmation
from smtpfleet.queue.keys import Keys
from smtpfleet.queue.routes import ClusterRoutes, Observers, Routes, SingleRoutes, route_for

# The client for commands that name their keys: one server's, or the cluster's (which sends
# each command to the primary of its key's slot and follows MOVED/ASK).
RedisClient = aioredis.Redis | RedisCluster


class _HiredisPacking(AbstractConnection):
    """A connection whose commands hiredis packs (C): same bytes as redis-py's Python packer.

    A command with a large argument (a message body above redis-py's buffer cutoff, 6 KB)
    still goes through redis-py's packer, which sends such a value as it is: hiredis copies
    the whole command into one buffer, a second copy of every large message while it is
    written (a burst of 20 MB messages took a node 16 MB past its memory budget)."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        name = args[0]
        # A command name of several words ("SCRIPT LOAD") goes as separate arguments, as there.
        if isinstance(name, str):
            args = (*name.encode().split(), *args[1:])
        elif isinstance(name, bytes) and b" " in name:
            args = (*name.split(), *args[1:])
        cutoff = self._buffer_cutoff
        for arg in args:
            if isinstance(arg, bytes | str | memoryview) and len(arg) > cutoff:
                return super().pack_command(*args)
        try:
            return [hiredis.pack_command(cast(Any, args))]
        except TypeError:
            # What hiredis does not take (bytearray; None or bool, which redis-py refuses
            # with its own DataError): redis-py's packer, as before.
            return super().pack_command(*args)


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packed(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (plain, TLS, Unix socket, Sentinel-managed) with hiredis packing its commands;
    one class per base, so that pools of the same kind share it."""
    if base not in _PACKED:
        _PACKED[base] = type(f"Packed{base.__name__}", (_HiredisPacking, base), {})
    return _PACKED[base]


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary's connections from Sentinel, with the blocking pool's waiting."""


class KeptCommandTable(AsyncCommandsParser):
    """The cluster client's command table (COMMAND: where each command's keys are), loaded
    once and kept when the client re-reads the slot table.

    redis-py re-reads the slot table after any connection error and then asks its default
    node, the primary of slot 0, for the command table again. While that primary is dead
    (until its replica is promoted, 2-3 s in the cluster drill) every command failed, for
    every slot: a node's heartbeats to a healthy primary failed, the node fenced itself and
    its peers took its deliveries over (redis-cluster-primary-kill, docs/drills.md). The
    table is the servers' and does not change when a primary dies; a command it does not know
    (a server upgraded meanwhile) still reloads it (`get_keys` calls `initialize()`).
    """

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None and self.commands:
            self.node = node  # a re-read slot table: where COMMAND GETKEYS goes now
            return
        await super().initialize(node)


@dataclass
class RedisConnection:
    client: RedisClient
    sentinel: Sentinel | None = None  # its own connections to the Sentinels
    # Redis Cluster: the options for each primary's own client (see queue/routes.py).
    node_options: dict[str, Any] | None = None

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()

    def routes(self, keys: Keys, confirmation: Confirmation | None, observers: Observers) -> Routes:
        """Where each shard's batched commands go: this client, or each slot's primary."""
        if isinstance(self.client, RedisCluster):
            options = self.node_options or {}
            return ClusterRoutes(self.client, keys, confirmation, options, observers)
        return SingleRoutes(route_for("redis", self.client, confirmation, observers))


def connect(config: RedisConfig) -> RedisConnection:
    """A client for the queue's Redis (connections are made on first use)."""
    timeouts = {
        "socket_timeout": config.socket_timeout_s,
        "socket_connect_timeout": config.socket_timeout_s,
    }
    if config.cluster:
        return _cluster(config, timeouts)
    if not config.sentinels:
        options: dict[str, Any] = {
            "max_connections": config.max_connections,
            "timeout": config.socket_timeout_s,
            "health_check_interval": 30,
            **_credentials(config),
            **_tls(config),
            **timeouts,
        }
        # What from_url does, but the URL's connection class (redis, rediss, unix) packs with
        # hiredis: from_url lets the URL's own class override the one it is given.
        options.update(parse_url(config.url))
        options["connection_class"] = packed(options.get("connection_class", aioredis.Connection))
        pool = aioredis.BlockingConnectionPool(**options)
        return RedisConnection(aioredis.Redis.from_pool(pool))
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [parse_hostport(address) for address in config.sentinels],
        sentinel_kwargs={**timeouts, **_sentinel_credentials(config)},
        **timeouts,
    )
    pool = BlockingSentinelPool(  # type: ignore[no-untyped-call]
        config.master_name,
        sentinel,
        max_connections=config.max_connections,
        timeout=config.socket_timeout_s,
        health_check_interval=30,
        db=_database(config.url),
        connection_class=packed(
            SentinelManagedSSLConnection if config.tls else SentinelManagedConnection
        ),
        **_credentials(config),
        **_tls(config),
        **timeouts,
    )
    return RedisConnection(aioredis.Redis.from_pool(pool), sentinel)


def _cluster(config: RedisConfig, timeouts: dict[str, Any]) -> RedisConnection:
    url = urlparse(config.url)
    seeds = [(url.hostname or "127.0.0.1", url.port or 6379)]
    seeds += [parse_hostport(address) for address in config.cluster_nodes]
    # rediss://: TLS to every node, verified against tls_ca_file (with the client certificate).
    tls: dict[str, Any] = {"ssl": True, **_tls(config)} if url.scheme == "rediss" else {}
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        max_connections=config.max_connections,
        # A node may hold no slot for a moment (a failover): keep serving the other shards.
        require_full_coverage=False,
        # RedisCluster takes no ssl_password (redis-py 5): its own connections could still
        # prompt for an encrypted client key; the primaries' clients below cannot.
        **{key: value for key, value in tls.items() if key != "ssl_password"},
        **_credentials(config),
        **timeouts,
    )
    client.commands_parser = KeptCommandTable()
    # Each primary's own client carries the batched accepts and deliveries (queue/routes.py):
    # it packs with hiredis. The cluster client's own connections (the other commands) keep
    # redis-py's packer: it names its connection class itself.
    node_options = {
        "connection_class": packed(aioredis.SSLConnection if tls else aioredis.Connection),
        "max_connections": config.max_connections,
        "timeout": config.socket_timeout_s,
        "health_check_interval": 30,
        **_credentials(config),
        **timeouts,
    }
    if tls:
        node_options.update(_tls(config))
    return RedisConnection(client, node_options=node_options)


def _credentials(config: RedisConfig) -> dict[str, Any]:
    """The data nodes' ACL user and password: the settings, else those written in the URL
    (from_url reads them itself; the Sentinel pool needs them given)."""
    url = urlparse(config.url)
    given = {
        "username": config.username or (unquote(url.username) if url.username else None),
        "password": config.password or (unquote(url.password) if url.password else None),
    }
    return {key: value for key, value in given.items() if value is not None}


def _tls(config: RedisConfig) -> dict[str, Any]:
    """The TLS settings of a `rediss://` connection (redis-py verifies the server's name)."""
    given = {
        "ssl_ca_certs": config.tls_ca_file,
        "ssl_certfile": config.tls_cert_file,
        "ssl_keyfile": config.tls_key_file,
        # redis-py hands it to load_cert_chain: an encrypted key is an error, never a prompt.
        "ssl_password": no_passphrase if config.tls_key_file else None,
    }
    return {key: value for key, value in given.items() if value} if config.tls else {}


def _sentinel_credentials(config: RedisConfig) -> dict[str, Any]:
    given = {"username": config.sentinel_username, "password": config.sentinel_password}
    return {key: value for key, value in given.items() if value is not None}


def _database(url: str) -> int:
    path = urlparse(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def access_denied(error: BaseException) -> str | None:
    """Why Redis will not take us whatever we wait for (credentials, ACL, an untrusted
    certificate), from an exception and its causes; None: anything else (maybe transient).

    redis-py wraps the TLS error in a ConnectionError whose context is the ssl error.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, redis.exceptions.AuthenticationError):
            return f"authentication refused (redis.username, redis.password): {seen}"
        if isinstance(seen, redis.exceptions.NoPermissionError):
            return f"the ACL user may not run a command smtpfleet needs: {seen}"
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return f"the server's TLS certificate is not trusted (redis.tls_ca_file): {seen}"
        seen = seen.__cause__ or seen.__context__
    return None
