"""The delivery worker's rules on the in-memory queue and scripted relays: no sockets, no Redis.

Failover to the next relay at once, parking when no relay is eligible, fencing in the middle
of a delivery, bounce vs dead letter, lease refresh, deleted entries, and backing off from an
entry that fails unexpectedly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from smtpfleet.config import Config, build_config
from smtpfleet.delivery.classify import Verdict, classify_reply, limit_reached
from smtpfleet.delivery.outcome import PARK_MS
from smtpfleet.delivery.worker import DeliveryWorker
from smtpfleet.envelope import Kind, QueuedMessage, new_qid, now_ms
from smtpfleet.metrics import Metrics
from smtpfleet.queue.classes import TrafficClasses
from smtpfleet.queue.deliveries import Delivery
from smtpfleet.relays.ring import Ring, routing_key
from smtpfleet.testing import eventually
from smtpfleet.testing.memory import MemoryClusterStore, MemoryQueue, ScriptedRelays

TEMPFAIL = classify_reply(451, "4.3.0 try later")
UNKNOWN_USER = classify_reply(550, "5.1.1 no such user")


def make_config(**overrides: Any) -> Config:
    tree: dict[str, Any] = {
        "redis": {"shards": 2},
        "relays": [
            {"name": "relay-1", "host": "10.0.0.1"},
            {"name": "relay-2", "host": "10.0.0.2"},
        ],
        "retry": {"initial_s": 60.0, "jitter": 0.0},
        "cluster": {"heartbeat_interval_s": 0.05, "lease_s": 1.0, "lease_refresh_s": 0.05},
    }
    tree.update(overrides)
    return build_config(tree, {})


@dataclass
class Bench:
    config: Config = field(default_factory=make_config)
    queue: MemoryQueue = field(default_factory=MemoryQueue)
    relays: ScriptedRelays = field(default_factory=ScriptedRelays)
    metrics: Metrics = field(default_factory=Metrics)
    healthy: set[str] = field(default_factory=lambda: {"relay-1", "relay-2"})
    fenced: bool = False
    worker: DeliveryWorker = field(init=False)
    store: MemoryClusterStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = MemoryClusterStore(self.queue)
        self.worker = DeliveryWorker(
            queue=self.queue,
            ring=Ring(self.config.relays),
            relays=self.relays,
            config=self.config,
            consumer="node-a",
            hostname="mx.test",
            store=self.store,
            metrics=self.metrics,
            healthy=lambda: self.healthy,
            may_deliver=lambda: not self.fenced,
        )

    def order(self, message: QueuedMessage) -> list[str]:
        """The relays in this message's ring order."""
        key = routing_key(message, self.config.routing.key)
        return [r.name for r in Ring(self.config.relays).order(key, self.healthy, {})]

    def message(self, sender: str = "s@example.com", *rcpts: str) -> QueuedMessage:
        recipients = rcpts or ("a@example.org",)
        return QueuedMessage(new_qid(0), sender, recipients, now_ms())

    async def deliver(self, message: QueuedMessage) -> Delivery:
        """Hand one entry to the worker (as a takeover does) and wait until it is settled."""
        delivery = self.queue.hand_out(message, "node-a")
        self.worker.adopt([delivery])
        await eventually(lambda: self.worker.in_flight == 0, timeout_s=5)
        return delivery

    def counter(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    bench = Bench()
    yield bench
    await bench.worker.stop(0.0)


async def test_a_temporary_answer_goes_to_the_next_relay_at_once(bench: Bench) -> None:
    message = bench.message()
    first, second = bench.order(message)
    bench.relays.script(first, lambda _: TEMPFAIL)

    await bench.deliver(message)

    assert bench.relays.sent == [(first, ("a@example.org",)), (second, ("a@example.org",))]
    [(_, finish)] = bench.queue.finished
    assert finish.done  # delivered by the second relay: nothing waits
    assert bench.queue.retries == []
    assert message.qid not in bench.queue.bodies


async def test_only_the_recipients_still_waiting_go_to_the_next_relay(bench: Bench) -> None:
    message = bench.message("s@example.com", "ok@example.org", "later@example.org")
    first, second = bench.order(message)
    bench.relays.script(first, lambda r: TEMPFAIL if r.startswith("later") else _ok())

    await bench.deliver(message)

    assert bench.relays.sent[1] == (second, ("later@example.org",))
    assert bench.queue.finished[0][1].done


async def test_every_relay_temporary_waits_with_backoff(bench: Bench) -> None:
    message = bench.message()
    for name in ("relay-1", "relay-2"):
        bench.relays.script(name, lambda _: TEMPFAIL)

    await bench.deliver(message)

    [(due_ms, again)] = bench.queue.retries
    assert again.attempts == 1
    assert again.last_errors == {"a@example.org": TEMPFAIL.text}
    assert due_ms >= now_ms() + 50_000  # initial_s 60, no jitter
    assert bench.queue.dead == []
    assert bench.queue.enqueued == []


async def test_a_relays_4xx_stands_over_our_own_limit_at_the_next_relay(bench: Bench) -> None:
    """relay-1 answered 451, relay-2 was at our own rate limit: the attempt counts and backs
    off with relay-1's error, where it was parked, uncounted, with our limit's words (and
    an expiry DSN then reported them as the relay's diagnostic)."""
    message = bench.message()
    first, second = bench.order(message)
    bench.relays.script(first, lambda _: TEMPFAIL)
    bench.relays.script(second, lambda _: limit_reached())

    await bench.deliver(message)

    [(due_ms, again)] = bench.queue.retries
    assert again.attempts == 1
    assert again.last_errors == {"a@example.org": TEMPFAIL.text}
    assert due_ms >= now_ms() + 50_000  # the backoff, not the 2 s park


async def test_no_eligible_relay_parks_the_entry_without_counting_an_attempt(bench: Bench) -> None:
    bench.healthy = set()
    message = bench.message()
    before = now_ms()

    await bench.deliver(message)

    assert bench.relays.sent == []
    [(due_ms, parked)] = bench.queue.retries
    assert parked == message  # the same attempt count, the same errors
    assert before + PARK_MS <= due_ms <= now_ms() + PARK_MS
    assert bench.queue.enqueued == []
    assert bench.queue.dead == []
    assert message.qid in bench.queue.bodies  # still referred to by the retry


async def test_the_reader_leaves_mail_in_the_stream_while_no_relay_is_healthy(
    bench: Bench,
) -> None:
    bench.healthy = set()
    bench.queue.add(bench.message())
    bench.worker.start()
    await asyncio.sleep(0.3)

    assert bench.queue.pending == {}  # never read: no per-message timers during an outage
    bench.healthy = {"relay-1", "relay-2"}
    await eventually(lambda: len(bench.queue.finished) == 1, timeout_s=5)


async def test_fenced_mid_delivery_stops_before_the_next_relay_and_leaves_it_pending(
    bench: Bench,
) -> None:
    message = bench.message()
    first, _ = bench.order(message)

    def fence() -> None:
        bench.fenced = True  # Redis lost while the first relay was being tried

    bench.relays.script(first, lambda _: TEMPFAIL).before_send = fence

    delivery = await bench.deliver(message)

    assert [relay for relay, _ in bench.relays.sent] == [first]  # never the second relay
    assert bench.queue.finished == []
    assert bench.queue.pending_of("node-a") == [delivery.key]


async def test_a_permanent_failure_bounces_to_the_sender(bench: Bench) -> None:
    for name in ("relay-1", "relay-2"):
        bench.relays.script(name, lambda _: UNKNOWN_USER)
    message = bench.message()

    await bench.deliver(message)

    [dsn] = bench.queue.enqueued
    assert dsn.kind is Kind.DSN
    assert dsn.sender == ""
    assert dsn.recipients == (message.sender,)
    assert b"5.1.1" in dsn.data
    assert bench.queue.finished[0][1].done
    assert bench.queue.dead == []
    assert bench.counter("smtpfleet_bounces_total") == 1
    assert len(bench.relays.sent) == 1  # a 5xx is final: no second relay


@pytest.mark.parametrize(
    ("sender", "kind"),
    [("", Kind.MAIL), ("s@example.com", Kind.DSN), ("bad\x01@example.com", Kind.MAIL)],
    ids=["null sender", "our own bounce", "unsendable sender"],
)
async def test_a_failure_nobody_may_be_told_of_goes_to_the_dead_letters(
    bench: Bench, sender: str, kind: Kind
) -> None:
    for name in ("relay-1", "relay-2"):
        bench.relays.script(name, lambda _: UNKNOWN_USER)
    message = QueuedMessage(new_qid(0), sender, ("a@example.org",), now_ms(), kind=kind)

    await bench.deliver(message)

    assert bench.queue.enqueued == []
    [(dead, reason)] = bench.queue.dead
    assert dead.recipients == ("a@example.org",)
    assert reason == f"a@example.org: {UNKNOWN_USER.text}"
    assert message.qid in bench.queue.bodies  # the dead letter keeps its body
    assert bench.counter("smtpfleet_dead_letters_total") == 1


async def test_in_flight_entries_keep_their_lease_fresh(bench: Bench) -> None:
    release = asyncio.Event()
    message = bench.message()
    first, _ = bench.order(message)
    bench.relays.relay(first).before_send = release.wait
    bench.worker.start()
    entry_id = bench.queue.add(message)

    await eventually(lambda: len(bench.store.lease_refreshes) >= 2, timeout_s=5)
    assert {(message.shard, ""): [entry_id]} in bench.store.lease_refreshes
    release.set()
    await eventually(lambda: len(bench.queue.finished) == 1, timeout_s=5)
    refreshes = len(bench.store.lease_refreshes)
    await eventually(lambda: len(bench.store.lease_refreshes) > refreshes, timeout_s=5)
    assert bench.store.lease_refreshes[-1] == {}  # finished: its lease is left to lapse


async def test_an_entry_deleted_while_pending_is_only_acknowledged(bench: Bench) -> None:
    message = bench.message()
    delivery = bench.queue.hand_out(message, "node-a")
    bench.queue.delete(message.qid)  # `smtpfleet queue delete` while it was pending
    [gone] = await bench.queue.read_own_pending("node-a", 10)
    assert gone.message is None

    bench.worker.adopt([gone])
    await eventually(lambda: bench.worker.in_flight == 0, timeout_s=5)

    [(finished, finish)] = bench.queue.finished
    assert finished.key == delivery.key
    assert finish.done
    assert bench.queue.pending == {}
    assert bench.queue.retries == []
    assert bench.relays.sent == []


async def test_a_cancelled_accept_is_never_sent(bench: Bench) -> None:
    message = bench.message()
    delivery = bench.queue.hand_out(message, "node-a")
    del bench.queue.bodies[message.qid]  # tombstoned: the client was told 451

    bench.worker.adopt([delivery])
    await eventually(lambda: bench.worker.in_flight == 0, timeout_s=5)

    assert bench.relays.sent == []
    assert bench.queue.finished[0][1].done


async def test_an_unexpected_error_backs_off_instead_of_spinning(bench: Bench) -> None:
    def broken(_: str) -> Verdict:
        raise RuntimeError("a bug")

    for name in ("relay-1", "relay-2"):
        bench.relays.script(name, broken)
    message = bench.message()
    bench.worker.start()
    bench.queue.add(message)

    await eventually(lambda: len(bench.queue.finished) == 1, timeout_s=5)
    await asyncio.sleep(0.3)

    assert len(bench.relays.sent) == 1  # not re-read at once, again and again
    [(due_ms, again)] = bench.queue.retries
    assert again.attempts == 1
    assert again.recipients == message.recipients
    assert again.last_errors == {"a@example.org": "local error: RuntimeError"}
    assert due_ms >= now_ms() + 50_000
    assert bench.queue.pending == {}
    assert bench.queue.dead == []


async def test_redis_away_mid_delivery_leaves_the_entry_for_the_rescan(bench: Bench) -> None:
    message = bench.message()
    first, _ = bench.order(message)

    def away() -> None:
        bench.queue.unavailable = True

    bench.relays.relay(first).before_send = away
    bench.worker.start()
    bench.queue.add(message)
    await eventually(lambda: len(bench.relays.sent) == 1, timeout_s=5)
    await asyncio.sleep(0.2)
    assert bench.queue.finished == []

    bench.relays.relay(first).before_send = None
    bench.queue.unavailable = False
    # Its own pending entry is read again once the queue is back, and finished with what
    # the worker knows: the relay took it, so it is not sent a second time.
    await eventually(lambda: len(bench.queue.finished) == 1, timeout_s=10)
    assert bench.queue.finished[0][1].done
    await asyncio.sleep(0.2)
    assert len(bench.relays.sent) == 1


def _ok() -> Verdict:
    return classify_reply(250, "2.0.0 ok")


async def test_an_accept_may_read_for_the_worker_only_when_its_reader_would() -> None:
    # queue.LocalReader: the accept reads its own entry for this worker when the worker's
    # reader would read one now; otherwise the entry waits in the stream for any reader.
    config = make_config(
        queue={"classes": [{"name": "urgent", "tenants": ["otp"]}, {"name": "bulk"}]},
        delivery={"concurrency": 1},
    )
    bench = Bench(config=config)
    top, lower = TrafficClasses.from_config(config.queue).lanes
    assert not bench.worker.wants(top)  # not started
    bench.worker.start()
    try:
        await eventually(lambda: bench.worker.wants(top))  # its own pending were read again
        assert not bench.worker.wants(lower)  # the reader fills slots in class order
        bench.fenced = True
        assert not bench.worker.wants(top)
        bench.fenced = False
        bench.healthy = set()
        assert not bench.worker.wants(top)
        bench.healthy = {"relay-1", "relay-2"}
        gate = asyncio.Event()
        message = bench.message()
        for name in bench.order(message):
            bench.relays.relay(name).before_send = gate.wait  # the one slot stays busy
        bench.worker.take(bench.queue.hand_out(message, "node-a"))
        assert bench.worker.in_flight == 1
        assert not bench.worker.wants(top)
        gate.set()
        await eventually(lambda: bench.worker.in_flight == 0)
        assert bench.worker.wants(top)
    finally:
        await bench.worker.stop(0.0)
