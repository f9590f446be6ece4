"""`smtpfleet loadtest` at its edges: numbers that never end or exceed what a node takes, a
duration that must bound a paced run, targets that are not a working SMTP server (the summary
must say why nothing was accepted), and Ctrl-C (the summary of what was sent, exit 130).

Every target is real and on 127.0.0.1: an aiosmtpd sink (answering 500 where a test says so),
plain TCP listeners that speak HTTP or say nothing, a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from smtpfleet.config import InboundConfig
from smtpfleet.testing import eventually
from smtpfleet.testing.client import finish_cli, start_cli
from smtpfleet.testing.redis_server import free_port
from smtpfleet.testing.sink import Sink

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

NODE_LIMIT = InboundConfig().max_message_bytes  # what a node accepts by default

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def loadtest(*args: str, timeout_s: float = 40.0) -> tuple[int, str, str, float]:
    started = time.monotonic()
    code, out, err = await finish_cli(await start_cli("loadtest", *args), timeout_s)
    return code, out, err, time.monotonic() - started


def one_line_without_traceback(err: str) -> str:
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture
async def listener() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """Plain TCP servers on 127.0.0.1 with a handler of the test's; the port of each."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_help_tells_the_size_limit_a_default_node_accepts() -> None:
    code, out, _ = await finish_cli(await start_cli("loadtest", "--help"), 20)
    assert code == 0
    assert f"at most {NODE_LIMIT}: a node's default inbound.max_message_bytes" in " ".join(
        out.split()
    )


@pytest.mark.parametrize(
    "bad",
    [
        ("--duration", "inf"),
        ("--settle", "inf"),
        ("--rate", "inf"),
        ("--size", "100000000000000"),
        ("--size", str(NODE_LIMIT + 1)),
        ("--concurrency", "100000000"),
    ],
)
async def test_a_number_that_never_ends_or_no_node_takes_is_a_usage_error(
    bad: tuple[str, str],
) -> None:
    amount = () if bad[0] == "--duration" else ("--count", "1")
    code, out, err, _ = await loadtest("--target", "127.0.0.1:1", *amount, *bad, timeout_s=20)
    assert (code, out) == (2, "")
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"smtpfleet loadtest: error: argument {bad[0]}: ")


@pytest.mark.parametrize(
    ("duration", "rate"),
    [("3", "0.05"), ("2", "0.0000001")],
    ids=["next-send-past-the-end", "next-send-in-115-days"],
)
@pytest.mark.solo
async def test_the_duration_bounds_a_paced_run(sink: Sink, duration: str, rate: str) -> None:
    # Before: the second send waited for its slot (20 s; 10**7 s: a hang), past the duration.
    paced = ("--duration", duration, "--rate", rate, "--concurrency", "1")
    code, out, err, took_s = await loadtest("--target", sink.address, *paced, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["sent"], report["accepted"]) == (1, 1)
    assert float(duration) <= report["elapsed_s"] < float(duration) + 1
    assert took_s < float(duration) + 5


async def test_a_refused_port_is_named_as_the_cause() -> None:
    port = free_port()  # bound, then closed: nothing listens there
    code, out, err, _ = await loadtest("--target", f"127.0.0.1:{port}", "--count", "3")
    assert code == 1
    assert f"not accepted: 127.0.0.1:{port}: connection refused (3)" in out
    assert one_line_without_traceback(err) == "smtpfleet: no message was accepted by --target"


async def test_a_name_that_does_not_resolve_is_named_as_the_cause() -> None:
    # .invalid never resolves (RFC 6761 §6.4).
    target = ("--target", "nohost.invalid:25", "--allow-remote")
    code, out, err, _ = await loadtest(*target, "--count", "2", "--json")
    assert code == 1
    causes = json.loads(out)["causes"]
    assert list(causes) == [next(c for c in causes if c.startswith("nohost.invalid: name not"))]
    assert causes[next(iter(causes))] == 2
    one_line_without_traceback(err)


async def test_a_server_that_refuses_is_quoted(sink: Sink) -> None:
    sink.faults.mail_reply = "500 5.5.1 what"
    code, out, err, _ = await loadtest("--target", sink.address, "--count", "4")
    assert code == 1
    assert "replies: 500: 4" in out
    assert f"not accepted: {sink.address}: MAIL refused: 500 5.5.1 what (4)" in out
    one_line_without_traceback(err)


async def test_an_http_server_is_named_not_smtp_at_once(
    listener: Callable[[Handler], Awaitable[int]],
) -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    port = await listener(http)
    code, out, err, took_s = await loadtest("--target", f"127.0.0.1:{port}", "--count", "2")
    assert code == 1
    assert f"127.0.0.1:{port}: answered 'HTTP/1.1 400 Bad Request': not SMTP (2)" in out
    assert took_s < 10
    one_line_without_traceback(err)


async def test_a_server_that_never_greets_is_given_up_on_and_named(
    listener: Callable[[Handler], Awaitable[int]],
) -> None:
    async def waits_for_a_request(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()  # an HTTP server: it waits for us to speak first

    port = await listener(waits_for_a_request)
    # Before: each session waited out the 30 s command timeout for a greeting.
    code, out, err, took_s = await loadtest("--target", f"127.0.0.1:{port}", "--count", "1")
    assert code == 1
    assert f"127.0.0.1:{port}: no SMTP greeting within 10 s (1)" in out
    assert took_s < 20
    one_line_without_traceback(err)
    # Within a --duration run, the greeting waits only for what is left of the run.
    code, out, _, took_s = await loadtest("--target", f"127.0.0.1:{port}", "--duration", "1")
    assert code == 1
    assert "no SMTP greeting within 2 s" in out
    assert took_s < 10


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
async def test_ctrl_c_prints_what_was_sent_and_exits_130(sink: Sink, as_json: bool) -> None:
    args = ("--target", sink.address, "--duration", "30", "--rate", "5")
    process = await start_cli("loadtest", *args, *(("--json",) if as_json else ()))
    await eventually(lambda: sink.count >= 3, timeout_s=20)
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    code, out, err = await finish_cli(process, timeout_s=20)
    assert code == 130
    assert time.monotonic() - interrupted < 5
    assert one_line_without_traceback(err).startswith("smtpfleet: interrupted after ")
    if as_json:
        report = json.loads(out)
        assert report["interrupted"] is True
        assert report["accepted"] >= 3
    else:
        first = out.splitlines()[0]
        assert first.startswith("sent "), out
        assert first.endswith("(interrupted)"), out
        assert int(first.split()[3]) >= 3  # "sent N, accepted M in ..."
