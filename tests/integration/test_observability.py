"""Metrics, probes and structured logs, scraped and read as an operator would."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from smtpfleet.config import HttpConfig
from smtpfleet.http import MAX_REQUEST_LINE, HttpServer
from smtpfleet.logs import JsonFormatter, TickHandler
from smtpfleet.testing import (
    LocalCluster,
    eventually,
    make_message,
    node_config,
    running_node,
    send,
)
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)


async def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_and_probes(redis_url: str, prefix: str, sink: Sink) -> None:
    sink.faults.rcpt_replies = {"gone@example.net": "550 5.1.1 User unknown"}
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        assert node.http is not None
        http = node.http.address
        assert await http_get(http, "/healthz") == (200, "ok\n")
        assert await http_get(http, "/readyz") == (200, "ready\n")
        assert (await send(node.inbound.addresses[0])).code == 250
        assert (await send(node.inbound.addresses[0], recipients=["v@elsewhere.org"])).code == 250
        assert (await send(node.inbound.addresses[0], recipients=["gone@example.net"])).code == 250
        await eventually(lambda: sink.count == 3)  # two messages and one DSN
        status, text = await http_get(http, "/metrics")
        assert status == 200
        metrics = samples(text)
        assert metrics[("smtpfleet_smtp_messages_total", (("result", "queued"),))] == 3
        assert metrics[("smtpfleet_smtp_replies_total", (("class", "5xx"),))] == 0
        delivered = ("smtpfleet_deliveries_total", (("outcome", "2xx"), ("relay", "relay-1")))
        assert metrics[delivered] >= 3
        refused = ("smtpfleet_deliveries_total", (("outcome", "5xx"), ("relay", "relay-1")))
        assert metrics[refused] == 1
        assert metrics[("smtpfleet_bounces_total", ())] == 1
        assert metrics[("smtpfleet_accept_latency_seconds_count", ())] == 3
        assert metrics[("smtpfleet_relay_up", (("relay", "relay-1"), ("view", "cluster")))] == 1
        assert metrics[("smtpfleet_live_nodes", ())] == 1
        # Group commit: every enqueue went through the accept batcher's pipelines.
        accept_batches = (("batcher", "accept"),)
        assert metrics[("smtpfleet_redis_batch_commands_count", accept_batches)] >= 1
        assert metrics[("smtpfleet_redis_batch_commands_sum", accept_batches)] >= 3
        assert metrics[("smtpfleet_redis_batch_commands_count", (("batcher", "delivery"),))] >= 1
        assert ("smtpfleet_redis_confirmations_total", ()) in metrics
        assert (
            "smtpfleet_tls_handshakes_total",
            (("direction", "inbound"), ("result", "failed"), ("version", "none")),
        ) in metrics
        node.draining = True
        assert await http_get(http, "/readyz") == (503, "not ready: draining\n")
        assert (await http_get(http, "/nope"))[0] == 404


async def test_messages_chained_on_a_relay_session_are_counted(redis_url: str, prefix: str) -> None:
    """A node's relay sessions carry the next message's envelope with a body when messages
    wait for the relay's one connection; operators see it per relay."""
    async with Sink(name="chaining", pipelining=True) as sink:
        sink.faults.delay_s = 0.05  # deliveries overlap: the later ones wait for the session
        host, port = sink.address.rsplit(":", 1)
        relay = {"name": "relay-1", "host": host, "port": int(port), "max_connections": 1}
        config = node_config(redis_url, [], {"redis": {"prefix": prefix}, "relays": [relay]})
        async with running_node(config) as node:
            assert node.http is not None
            address = node.inbound.addresses[0]
            replies = await asyncio.gather(*(send(address) for _ in range(8)))
            assert {reply.code for reply in replies} == {250}
            await sink.wait_for(8)
            metrics = samples((await http_get(node.http.address, "/metrics"))[1])
            chained = metrics[("smtpfleet_relay_chained_messages_total", (("relay", "relay-1"),))]
            assert 1 <= chained <= 7


async def test_a_reply_lost_after_the_final_dot_is_counted(redis_url: str, prefix: str) -> None:
    """The relay stored the message and the session broke before its reply: it may be
    delivered twice (the retry), and operators see how often, per relay."""
    async with Sink(name="lossy") as sink:
        sink.faults.lose_data_reply = True
        host, port = sink.address.rsplit(":", 1)
        relay = {"name": "relay-1", "host": host, "port": int(port)}
        config = node_config(redis_url, [], {"redis": {"prefix": prefix}, "relays": [relay]})
        async with running_node(config) as node:
            assert node.http is not None
            http = node.http.address
            assert (await send(node.inbound.addresses[0])).code == 250
            key = ("smtpfleet_relay_replies_lost_total", (("relay", "relay-1"),))

            async def counted() -> bool:
                return samples((await http_get(http, "/metrics"))[1]).get(key) == 1

            await eventually(counted, timeout_s=10)
            assert sink.count == 1  # the relay has it; our side could not know


async def test_the_http_port_answers_what_it_cannot_read() -> None:
    """A request line or header over the limit gets 400, not a silent close; not GET, 405."""
    server = HttpServer(
        HttpConfig(listen="127.0.0.1:0"),
        registry=CollectorRegistry(),
        not_ready_reason=lambda: None,
    )
    await server.start()
    try:
        long_path = "/" + "a" * MAX_REQUEST_LINE
        assert (await http_get(server.address, long_path))[0] == 400
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * MAX_REQUEST_LINE + b"\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 Bad Request")
        writer.close()
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"POST /healthz HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 405 ")
        writer.close()
        assert await http_get(server.address, "/healthz") == (200, "ok\n")
    finally:
        await server.close()


def queue_gauges(text: str) -> dict[str, float]:
    found = samples(text)
    gauges = {
        state: found[("smtpfleet_queue_messages", (("state", state),))]
        for state in ("ready", "in_flight", "retry", "dead")
    }
    return gauges | {"oldest_age_s": found[("smtpfleet_queue_oldest_age_seconds", ())]}


async def test_queue_gauges_on_metrics_count_waiting_mail(redis_url: str, prefix: str) -> None:
    # The only relay is down: mail waits in the queue, where the gauges must show it.
    overrides = {"redis": {"prefix": prefix}, "health": {"interval_s": 0.2, "fall": 1}}
    async with running_node(node_config(redis_url, ["127.0.0.1:9"], overrides)) as node:
        assert node.http is not None
        status, text = await http_get(node.http.address, "/metrics")
        assert status == 200
        assert queue_gauges(text) == dict.fromkeys(("ready", "in_flight", "retry", "dead"), 0) | {
            "oldest_age_s": 0
        }
        for _ in range(3):
            assert (await send(node.inbound.addresses[0])).code == 250
        scraped: dict[str, float] = {}

        async def three_waiting() -> bool:
            scraped.update(queue_gauges((await http_get(node.http.address, "/metrics"))[1]))
            return scraped["ready"] + scraped["in_flight"] + scraped["retry"] == 3

        await eventually(three_waiting, timeout_s=15, interval_s=0.25)  # exported every 5 s
        assert scraped["dead"] == 0
        assert scraped["oldest_age_s"] > 0


async def test_node_logs_one_json_event_per_transaction_and_attempt() -> None:
    async with LocalCluster(nodes=1, sinks=1) as cluster:
        node = cluster.node_processes[0]
        secret = "the-body-must-not-be-logged"
        data = make_message(body=secret + "\r\n")
        reply = await send(node.smtp, data=data)
        qid = reply.text.rsplit(" ", 1)[-1]
        await eventually(lambda: cluster.sink_servers[0].count == 1)

        def logged() -> dict[tuple[str, str], dict[str, object]]:
            lines = [json.loads(line) for line in node.log_path.read_text().splitlines() if line]
            return {(e.get("event"), e.get("qid")): e for e in lines}

        # The attempt is logged once the relay's reply is in: it may follow the arrival.
        await eventually(lambda: ("delivery.attempt", qid) in logged())
        events = logged()
        transaction = events[("smtp.transaction", qid)]
        assert transaction["code"] == 250
        assert transaction["peer"] == "127.0.0.1"
        attempt = events[("delivery.attempt", qid)]
        assert attempt["relay"] == "relay-1"
        assert attempt["codes"] == [250]
        assert secret not in node.log_path.read_text()


class _Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


async def test_log_lines_of_one_loop_turn_leave_in_one_write() -> None:
    """Two lines per message under load were two write system calls per message."""
    stream = _Writes()
    handler = TickHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("smtpfleet.test.tick")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for n in range(3):
            logger.warning("line %d", n)
        assert stream.writes == []  # not before the loop turn ends
        await asyncio.sleep(0)
        assert len(stream.writes) == 1
        assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == [
            "line 0",
            "line 1",
            "line 2",
        ]
        # Outside the loop (a thread, start-up, shutdown) a record is written at once.
        await asyncio.to_thread(logger.warning, "from a thread")
        assert stream.writes[-1].startswith('{"ts"')
        assert "from a thread" in stream.writes[-1]
    finally:
        logger.removeHandler(handler)
