"""Helpers for tests and drills, shipped with the package so users can reuse them.

Everything here is real: a real Redis server process, real SMTP servers (aiosmtpd sinks) on
loopback port 0, nodes in-process or as separate processes, and a real SMTP client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import inspect
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

from smtpfleet.config import Config, QueueConfig, RedisConfig, build_config
from smtpfleet.localcluster import LocalCluster, NodeProcess, deep_merge
from smtpfleet.node import Node
from smtpfleet.queue.redis_admin import Admin, NotFound
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.redis_server import RedisServer, free_port
from smtpfleet.sink import Faults, Sink

__all__ = [
    "FaultProxy",
    "Faults",
    "LocalCluster",
    "NodeProcess",
    "RedisServer",
    "Reply",
    "Sink",
    "SteadyLoad",
    "eventually",
    "free_port",
    "make_message",
    "message_ids",
    "node_config",
    "run_cli",
    "running_node",
    "send",
    "whereabouts",
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


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> tuple[int, str, str]:
    """`python -m smtpfleet ARGS` as its own process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpfleet",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


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


class FaultProxy:
    """A TCP proxy in front of a relay, to break one path without touching the relay.

    mode "pass" forwards; "refuse" closes new connections at once; "blackhole" accepts and
    never answers. Existing connections are cut when the mode leaves "pass".
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode != "pass":
            for writer in list(self._writers):
                writer.close()

    async def stop(self) -> None:
        self.set_mode("refuse")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.close()
            return
        if self.mode == "blackhole":
            self._writers.add(writer)
            with contextlib.suppress(ConnectionError):
                await reader.read()
            self._writers.discard(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@dataclass
class SteadyLoad:
    """Send continuously over fresh sessions, like an MTA that tries the next MX on failure."""

    targets: Sequence[tuple[str, int]]
    interval_s: float = 0.01
    accepted: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    qids: dict[str, str] = field(default_factory=dict)  # Message-ID -> qid of its 250
    failovers: int = 0  # a target refused or dropped us and the next one took the message
    _stop: bool = False

    async def run(self, senders: int = 4) -> None:
        await asyncio.gather(*(self._sender(i) for i in range(senders)))

    def stop(self) -> None:
        self._stop = True

    async def _sender(self, index: int) -> None:
        n = 0
        while not self._stop:
            tag = f"<s{index}-{n}-{uuid.uuid4().hex[:6]}@steady.test>"
            n += 1
            reply = await self._send_once(index + n, tag)
            self.codes.append(reply.code)
            if reply.code == 250:
                self.accepted.append(tag)
                self.qids[tag] = reply.text.rsplit(" ", 1)[-1]
            await asyncio.sleep(self.interval_s)

    async def _send_once(self, start: int, tag: str) -> Reply:
        reply = Reply(0, "no target")
        for attempt in range(len(self.targets)):
            target = self.targets[(start + attempt) % len(self.targets)]
            reply = await send(target, data=make_message(message_id=tag), timeout_s=10)
            if reply.code == 250 or 500 <= reply.code < 600:
                return reply
            self.failovers += 1
        return reply

    async def wait_delivered(self, cluster: LocalCluster, timeout_s: float) -> None:
        """Every accepted message at a sink within timeout_s; else say where each missing one is."""

        def missing() -> list[str]:
            return sorted(set(self.accepted) - set(message_ids(cluster.sink_servers)))

        try:
            await eventually(lambda: not missing(), timeout_s=timeout_s)
        except TimeoutError:
            lost = missing()
            report = await whereabouts(cluster, {tag: self.qids[tag] for tag in lost[:5]})
            raise AssertionError(
                f"{len(lost)} accepted messages not delivered in {timeout_s}s:\n{report}"
            ) from None


async def whereabouts(cluster: LocalCluster, qids: Mapping[str, str]) -> str:
    """Where the queue holds each message (tag -> qid), and what the nodes logged of it."""
    assert cluster.redis is not None
    redis_config = RedisConfig(**{**cluster.overrides.get("redis", {}), "url": cluster.redis.url})
    queue = RedisQueue(redis_config, QueueConfig())
    admin = Admin(queue)
    lines: list[str] = []
    try:
        for tag, qid in qids.items():
            lines.append(f"{tag} {qid}: {await _place(admin, qid)}")
            for node in cluster.node_processes:
                lines.extend(
                    f"  node-{node.index}: {line}"
                    for line in node.log_tail(100_000).splitlines()
                    if qid in line
                )
    finally:
        await queue.close()
    return "\n".join(lines)


async def _place(admin: Admin, qid: str) -> str:
    body = "body kept" if await admin.headers(qid) else "no body"
    try:
        entry, _ = await admin.find(qid)
    except NotFound:
        return f"in no stream, retry set or dead letters; {body}"
    return f"{entry.state} {entry.as_dict()}; {body}"


def message_ids(sinks: Sequence[Sink]) -> collections.Counter[str]:
    """How often each Message-ID arrived, across sinks."""
    seen: collections.Counter[str] = collections.Counter()
    for sink in sinks:
        for message in sink.messages:
            head = message.data.split(b"\r\n\r\n", 1)[0]
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    seen[line.split(b":", 1)[1].strip().decode()] += 1
    return seen
