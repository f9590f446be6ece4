"""Helpers for tests and drills, shipped with the package so users can reuse them.

Everything here is real: a real Redis server process, real SMTP servers (aiosmtpd sinks) on
loopback port 0, nodes in-process or as separate processes, and a real SMTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiosmtplib

from smtpfleet.config import Config, build_config
from smtpfleet.localcluster import LocalCluster, NodeProcess, deep_merge
from smtpfleet.node import Node
from smtpfleet.redis_server import RedisServer, free_port
from smtpfleet.sink import Faults, Sink

__all__ = [
    "Faults",
    "LocalCluster",
    "NodeProcess",
    "RedisServer",
    "Reply",
    "Sink",
    "eventually",
    "free_port",
    "make_message",
    "node_config",
    "running_node",
    "send",
]

# Fast schedules so tests see retries in seconds, not minutes.
FAST_RETRY: dict[str, Any] = {
    "initial_s": 0.2,
    "max_s": 1.0,
    "jitter": 0.0,
    "scheduler_interval_s": 0.1,
}


def node_config(
    redis_url: str, relays: Sequence[str], overrides: Mapping[str, Any] | None = None
) -> Config:
    """A node on 127.0.0.1 port 0 that relays for loopback clients, with fast retries."""
    tree: dict[str, Any] = {
        "node": {"hostname": "node.test", "drain_grace_s": 5.0},
        "inbound": {"listen": ["127.0.0.1:0"], "relay_networks": ["127.0.0.0/8", "::1/128"]},
        "redis": {"url": redis_url, "shards": 4},
        "http": {"listen": "127.0.0.1:0"},
        "health": {"interval_s": 0.2, "timeout_s": 1.0},
        "cluster": {"heartbeat_interval_s": 0.2, "lease_s": 1.0, "lease_refresh_s": 0.5},
        "retry": FAST_RETRY,
        "relays": [_relay(i, address) for i, address in enumerate(relays)],
    }
    return build_config(deep_merge(tree, overrides or {}), {})


def _relay(index: int, address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"name": f"relay-{index + 1}", "host": host.strip("[]"), "port": int(port)}


@contextlib.asynccontextmanager
async def running_node(config: Config) -> AsyncIterator[Node]:
    """An in-process node; closed (not drained) on exit."""
    node = Node(config)
    await node.start()
    try:
        yield node
    finally:
        await node.close()


def make_message(
    *,
    sender: str = "sender@example.com",
    recipients: Sequence[str] = ("rcpt@example.net",),
    subject: str = "test",
    body: str = "hello\r\n",
    message_id: str | None = None,
) -> bytes:
    """A small RFC 5322 message with CRLF line endings and a unique Message-ID."""
    mid = message_id or f"<{uuid.uuid4().hex}@test.smtpfleet>"
    headers = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: {subject}",
        f"Message-ID: {mid}",
        f"Date: {email.utils.formatdate()}",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


@dataclass(frozen=True)
class Reply:
    code: int
    text: str


async def send(
    address: tuple[str, int],
    *,
    sender: str = "sender@example.com",
    recipients: Sequence[str] = ("rcpt@example.net",),
    data: bytes | None = None,
    timeout_s: float = 15.0,
) -> Reply:
    """Send one message over a fresh session; the final reply as seen on the wire.

    Connection failures become code 0 so load loops can count them without try/except.
    """
    payload = data if data is not None else make_message(sender=sender, recipients=recipients)
    client = aiosmtplib.SMTP(
        hostname=address[0], port=address[1], timeout=timeout_s, start_tls=False
    )
    try:
        async with client:
            # sendmail, not aiosmtplib.send: the latter refuses the null reverse-path.
            _, text = await client.sendmail(sender, list(recipients), payload)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0]
        return Reply(first.code, first.message)
    except aiosmtplib.SMTPResponseException as exc:
        return Reply(exc.code, exc.message)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        return Reply(0, f"{exc.__class__.__name__}: {exc}")
    return Reply(250, text)


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
) -> None:
    """Wait until predicate() (plain or async) is true; TimeoutError if not within timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
