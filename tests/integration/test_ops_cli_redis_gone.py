"""Redis that hangs or goes away in the middle of a CLI command, after it answered PING: one
line on stderr and exit code 1, as when it cannot be reached at all; never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from smtpfleet.config import build_config
from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import run_cli

pytestmark = pytest.mark.timeout(120)

SHARDS = 4


class TrippingProxy:
    """A TCP proxy on loopback in front of Redis that breaks after the client's `after`-th
    write (counted over all connections): "stall" stops forwarding (Redis seems hung),
    "close" cuts every connection and refuses new ones (Redis went away)."""

    def __init__(self, redis_port: int, mode: str, after: int) -> None:
        self.redis_port = redis_port
        self.mode = mode
        self.after = after
        self.writes = 0
        self.tripped = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TrippingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.tripped and self.mode == "close":
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counted: bool = False
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if counted:
                    self.writes += 1
                    self.tripped = self.tripped or self.writes > self.after
                if self.tripped and self.mode == "close":
                    for each in self._writers:
                        each.close()
                    return
                if self.tripped:
                    await asyncio.Event().wait()  # stalled until the test ends
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.fixture
async def queue_there(redis_url: str, prefix: str) -> str:
    """A queue as nodes leave one: every shard's stream and group, a message, a dead letter."""
    config = build_config({"redis": {"url": redis_url, "prefix": prefix, "shards": SHARDS}}, {})
    queue = RedisQueue(config.redis, config.queue)
    try:
        await queue.ensure_groups()
        qid = new_qid(1)
        await queue.enqueue(NewMessage(qid, "s@example.com", ("a@example.net",), b"x\r\n"))
    finally:
        await queue.close()
    return qid


COMMANDS = [
    ["status"],
    ["queue", "list"],
    ["queue", "show", "QID"],
    ["dead", "list"],
    ["dead", "requeue", "--all"],
    ["dead", "purge", "--all"],
]


async def writes_of(args: list[str], redis_port: int, env: dict[str, str]) -> int:
    """How many writes the command makes to Redis when nothing breaks."""
    async with TrippingProxy(redis_port, "close", 10**9) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        code, _, err = await run_cli(*args, "--redis", url, env=env)
        assert code == 0, err
        return proxy.writes


@pytest.mark.parametrize("mode", ["stall", "close"])
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
async def test_redis_lost_mid_command_is_one_line_and_exit_1(
    args: list[str], mode: str, redis_url: str, prefix: str, queue_there: str
) -> None:
    args = [queue_there if a == "QID" else a for a in args]
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    env = {
        "SMTPFLEET_REDIS__PREFIX": prefix,
        "SMTPFLEET_REDIS__SHARDS": str(SHARDS),
        "SMTPFLEET_REDIS__SOCKET_TIMEOUT_S": "0.5",
    }
    total = await writes_of(args, port, env)
    # Past the connection's set-up and PING, and before the command's last write.
    assert total >= 4, total
    async with TrippingProxy(port, mode, after=total - 2) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        code, out, err = await run_cli(*args, "--redis", url, env=env)
    assert proxy.tripped
    assert (code, out) == (1, ""), err
    assert re.fullmatch(
        rf"smtpfleet: Redis at {re.escape(url)} went away: redis: "
        r"(TimeoutError|ConnectionError): [^\n]+\n",
        err,
    ), err
