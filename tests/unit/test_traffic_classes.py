"""Traffic classes (queue/classes.py): which class a message falls in, the per-class keys and
retry schedules, and the worker filling its slots from the highest class first, with a floor
for the lower ones. Plain values and the in-memory queue: no Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpfleet.cli.ops import _class_lines
from smtpfleet.config import QueueConfig, RetryConfig, build_config
from smtpfleet.delivery.classify import classify_reply
from smtpfleet.delivery.worker import DeliveryWorker
from smtpfleet.drills.classes import class_measures
from smtpfleet.envelope import QueuedMessage, new_qid, now_ms
from smtpfleet.errors import ConfigError
from smtpfleet.loadgen.messages import message_bytes
from smtpfleet.loadgen.paced import Sent
from smtpfleet.metrics import Metrics
from smtpfleet.queue.classes import TrafficClasses, read_plan
from smtpfleet.queue.keys import Keys
from smtpfleet.relays.gate import PriorityGate
from smtpfleet.relays.ring import Ring
from smtpfleet.testing import eventually
from smtpfleet.testing.memory import MemoryClusterStore, MemoryQueue, ScriptedRelays
from smtpfleet.testing.sink import ReceivedMessage

CLASSES: dict[str, Any] = {
    "classes": [
        {"name": "transactional"},
        {
            "name": "bulk",
            "sender_domains": ["news.example", "*.promo.example"],
            "tenants": ["marketing"],
            "retry": {"initial_s": 900, "lifetime_s": 3600},
        },
    ],
    "class_header": "X-Smtpfleet-Class",
}


def classes(**overrides: Any) -> TrafficClasses:
    return TrafficClasses.from_config(QueueConfig.model_validate({**CLASSES, **overrides}))


def test_without_classes_there_is_one_lane_with_the_keys_of_before() -> None:
    none = TrafficClasses.from_config(QueueConfig())
    assert none.lanes == ("",)
    assert none.choose("a@news.example", "marketing", "bulk") == ""
    keys = Keys("sf", 4)
    assert keys.streams(1) == ["{sf:1}:stream"]
    assert keys.retry(1) == "{sf:1}:retry"


def test_the_default_class_keeps_the_unsuffixed_keys_and_others_share_its_slot() -> None:
    tc = classes()
    assert tc.lanes == ("", "bulk")
    keys = Keys("sf", 4, tc.lanes)
    assert keys.streams(2) == ["{sf:2}:stream", "{sf:2}:stream:bulk"]
    assert keys.retry(2, "bulk") == "{sf:2}:retry:bulk"
    assert keys.parse_stream("{sf:2}:stream:bulk") == (2, "bulk")
    assert keys.parse_stream("{sf:2}:stream") == (2, "")
    with pytest.raises(ValueError, match="not a stream key"):
        keys.parse_stream("{sf:2}:retry:bulk")
    # A default class further down the order still owns the unsuffixed keys.
    assert classes(default_class="bulk").lanes == ("transactional", "")


@pytest.mark.parametrize(
    ("sender", "tenant", "header", "lane"),
    [
        ("a@shop.example", None, None, ""),  # no condition matches: the default class
        ("a@news.example", None, None, "bulk"),  # sender domain
        ("a@x.promo.example", None, None, "bulk"),  # a subdomain pattern
        ("a@promo.example", None, None, ""),  # "*." means subdomains only
        ("a@shop.example", "marketing", None, "bulk"),  # tenant
        ("a@news.example", None, "transactional", ""),  # a trusted header wins
        ("a@shop.example", None, " BULK ", "bulk"),  # header values are names, any case
        ("a@news.example", None, "urgent", "bulk"),  # an unknown class asked for: ignored
    ],
)
def test_a_class_is_chosen_by_header_then_conditions_then_default(
    sender: str, tenant: str | None, header: str | None, lane: str
) -> None:
    assert classes().choose(sender, tenant, header) == lane


def test_an_international_class_domain_catches_its_mail() -> None:
    """Mail carries the A-label (xn--...): a class written with the U-label caught none of it,
    and that mail waited in the default class."""
    idn = {"name": "bulk", "sender_domains": ["bücher.example"]}
    catching = classes(classes=[{"name": "transactional"}, idn])
    assert catching.choose("o@xn--bcher-kva.example", None, None) == "bulk"


def test_each_class_has_its_own_retry_schedule_and_lifetime() -> None:
    base = RetryConfig(initial_s=60, max_s=600, lifetime_s=86400 * 5)
    bulk = classes().retry_for("bulk", base)
    assert (bulk.initial_s, bulk.max_s, bulk.lifetime_s) == (900, 600, 3600)
    assert classes().retry_for("", base) == base


def test_the_class_is_stored_with_the_entry_only_when_not_the_default() -> None:
    plain = QueuedMessage("0.AB", "s@x", ("r@y",), 1)
    assert '"c"' not in plain.encode()
    bulk = QueuedMessage("0.AB", "s@x", ("r@y",), 1, traffic_class="bulk")
    assert QueuedMessage.decode(bulk.encode()).traffic_class == "bulk"


def test_class_configuration_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="class names must be unique"):
        build_config({"queue": {"classes": [{"name": "a"}, {"name": "a"}]}}, {})
    with pytest.raises(ConfigError, match="default_class 'c' is not one of classes"):
        build_config({"queue": {"classes": [{"name": "a"}], "default_class": "c"}}, {})
    with pytest.raises(ConfigError, match=r"queue\.classes\.0\.name"):
        build_config({"queue": {"classes": [{"name": "Has:Colon"}]}}, {})


def test_the_read_plan_takes_the_floor_of_lower_classes_then_priority_order() -> None:
    lanes = ("", "bulk", "newsletter")
    assert read_plan(lanes, 10, {}, 2) == [
        ("bulk", 2),
        ("newsletter", 2),
        ("", 10),
        ("bulk", 10),
        ("newsletter", 10),
    ]
    # A lower class at its floor gets nothing ahead of the higher ones.
    assert read_plan(lanes, 10, {"bulk": 2, "newsletter": 5}, 2)[0] == ("", 10)
    assert read_plan(("",), 5, {}, 2) == [("", 5)]
    assert classes().floor_slots(64) == 6
    assert classes(class_share=0).floor_slots(64) == 0


def _worker(queue: MemoryQueue, relays: ScriptedRelays, **queue_config: Any) -> DeliveryWorker:
    config = build_config(
        {
            "redis": {"shards": 1},
            "relays": [{"name": "relay-1", "host": "10.0.0.1"}],
            "delivery": {"concurrency": 8, "block_ms": 50},
            "retry": {"initial_s": 60.0, "jitter": 0.0},
            "queue": {**CLASSES, "class_share": 0.25, **queue_config},
        },
        {},
    )
    return DeliveryWorker(
        queue=queue,
        ring=Ring(config.relays),
        relays=relays,
        config=config,
        consumer="node-a",
        hostname="mx.test",
        store=MemoryClusterStore(queue),
        metrics=Metrics(),
    )


def _fill(queue: MemoryQueue, lane: str, count: int) -> None:
    for _ in range(count):
        queue.add(
            QueuedMessage(new_qid(0), "s@x.example", ("r@y.example",), now_ms(), traffic_class=lane)
        )


async def test_a_worker_fills_its_slots_from_the_first_class_keeping_a_floor_for_bulk() -> None:
    queue, relays = MemoryQueue(shards=1), ScriptedRelays()
    hold = asyncio.Event()
    relays.relay("relay-1").before_send = hold.wait
    _fill(queue, "bulk", 20)  # the backlog came first ...
    _fill(queue, "", 10)  # ... the transactional mail after it
    worker = _worker(queue, relays)
    worker.start()
    try:
        await eventually(lambda: worker.in_flight >= 8, timeout_s=5)
        lanes = sorted(lane for _, lane, _ in queue.pending)
        # 8 slots, a floor of 2 (0.25 x 8) for bulk: 6 transactional, 2 bulk.
        assert lanes.count("") == 6
        assert lanes.count("bulk") == 2
    finally:
        hold.set()
        await worker.stop(1.0)


async def test_with_no_share_bulk_waits_until_the_first_class_is_empty() -> None:
    queue, relays = MemoryQueue(shards=1), ScriptedRelays()
    hold = asyncio.Event()
    relays.relay("relay-1").before_send = hold.wait
    _fill(queue, "bulk", 20)
    _fill(queue, "", 5)
    worker = _worker(queue, relays, class_share=0)
    worker.start()
    try:
        await eventually(lambda: worker.in_flight >= 8, timeout_s=5)
        lanes = sorted(lane for _, lane, _ in queue.pending)
        assert (lanes.count(""), lanes.count("bulk")) == (5, 3)  # bulk only in what was left
    finally:
        hold.set()
        await worker.stop(1.0)


async def test_a_bulk_tempfail_waits_by_the_bulk_schedule() -> None:
    queue, relays = MemoryQueue(shards=1), ScriptedRelays()
    relays.script("relay-1", lambda _r: classify_reply(451, "4.3.0 later"))
    _fill(queue, "bulk", 1)
    _fill(queue, "", 1)
    worker = _worker(queue, relays)
    worker.start()
    try:
        await eventually(lambda: len(queue.retries) == 2, timeout_s=5)
    finally:
        await worker.stop(1.0)
    delays = {
        message.traffic_class: round((due - message.accepted_ms) / 1000)
        for due, message in queue.retries
    }
    assert delays == {"bulk": 900, "": 60}


async def test_a_relay_slot_goes_to_the_first_class_then_in_arrival_order() -> None:
    gate: PriorityGate[object] = PriorityGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, priority: int) -> None:
        async with gate.held(priority):
            order.append(name)
            await release.wait()

    holder = asyncio.create_task(hold("first", 0))
    await eventually(lambda: order == ["first"])
    waiters = [
        asyncio.create_task(hold(name, priority))
        for name, priority in [("bulk-1", 1), ("gone", 0), ("urgent", 0), ("bulk-2", 1)]
    ]
    await eventually(lambda: gate.waiting == 4)
    waiters[1].cancel()  # a cancelled waiter gives up its turn and takes no slot
    await eventually(lambda: gate.waiting == 3)
    release.set()
    await asyncio.gather(holder, *waiters[0:1], *waiters[2:])
    assert order == ["first", "urgent", "bulk-1", "bulk-2"]
    async with gate.held(5):  # the slot came back
        pass


def _received(tag: str, at: float, sender: str = "s@x") -> ReceivedMessage:
    data = message_bytes(tag, 200)
    return ReceivedMessage(sender=sender, recipients=("r@y",), data=data, peer="p:1", at=at)


def test_the_drill_judges_transactional_waits_from_the_heal_and_bulk_behind_them() -> None:
    heal = 100.0
    sent = [
        Sent("t-1", at=95.0, code=250, latency_s=0.01, attempts=1),  # queued in the outage
        Sent("t-2", at=101.0, code=250, latency_s=0.01, attempts=1),  # sent after the heal
        Sent("t-0", at=80.0, code=250, latency_s=0.01, attempts=1),  # before the fault
    ]
    messages = [
        _received("t-1", 101.5),
        _received("t-2", 101.2),
        _received("b-1", 101.0),
        _received("b-2", 103.0),
        _received("b-3", 104.0),
    ]
    measures = class_measures(messages, {"b-1", "b-2", "b-3", "b-4"}, sent, 90.0, heal)
    assert measures == {
        "bulk_accepted": 4,
        "bulk_lost": 1,  # b-4 never arrived
        "bulk_drain_s": 4.0,
        "bulk_ahead_pct": 25.0,  # b-1 of 4 arrived before t-1
        "transactional_wait_after_heal_s": 1.5,  # t-1: heal to 101.5
        "transactional_backlog": 1,
    }


def test_status_prints_the_backlog_of_each_class_in_priority_order() -> None:
    figures = {"ready": 3.0, "in_flight": 1.0, "retry": 0.0, "oldest_age_s": 12.4}
    text = _class_lines({"transactional": figures, "bulk": {**figures, "ready": 900.0}})
    assert text.splitlines()[1:] == [
        "  class transactional: 3 ready, 1 in flight, 0 retrying; oldest 12s",
        "  class bulk: 900 ready, 1 in flight, 0 retrying; oldest 12s",
    ]
    assert _class_lines({}) == ""


async def test_a_holder_passes_its_slot_only_to_the_next_waiter_and_only_with_a_token() -> None:
    """`pass_on` (a message's session handed to the next one waiting): the slot goes to the
    waiter first in line if its token is accepted, never to one further back, and a passed
    slot is not freed again when its first holder leaves."""
    gate: PriorityGate[str] = PriorityGate(1)
    order: list[str] = []

    async def wait(name: str, priority: int, token: str | None) -> None:
        async with gate.held(priority, token):
            order.append(name)

    async with gate.held(0) as hold:
        plain = asyncio.create_task(wait("plain", 0, None))
        carried = asyncio.create_task(wait("carried", 1, "envelope"))
        await eventually(lambda: gate.waiting == 2)
        assert gate.pass_on(hold, lambda token: True) is None  # "plain" is first: no token
        assert not hold.passed
    await eventually(lambda: order == ["plain", "carried"])
    await asyncio.gather(plain, carried)

    async with gate.held(0) as hold:
        refused = asyncio.create_task(wait("refused", 0, "stale"))
        await eventually(lambda: gate.waiting == 1)
        assert gate.pass_on(hold, lambda token: token != "stale") is None
        order.clear()
    await refused
    async with gate.held(0) as hold:
        taker = asyncio.create_task(wait("taker", 0, "envelope"))
        await eventually(lambda: gate.waiting == 1)
        assert gate.pass_on(hold, lambda token: True) == "envelope"
        assert hold.passed
        await taker  # it ran while this holder still held on: the slot was passed, not shared
    assert order == ["refused", "taker"]
    async with gate.held(5):  # one slot, back once the taker left: not freed twice
        assert gate._free == 0
