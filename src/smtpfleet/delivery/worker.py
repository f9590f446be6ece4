"""Delivery workers: read the shared queue as this node's consumer and deliver each entry.

One reader feeds up to `delivery.concurrency` deliveries at once. An entry stays pending in
this consumer until its outcome is recorded in one transaction (`DeliveryQueue.finish`), so a
node that dies mid-delivery leaves nothing that survivors cannot claim. What the outcome is,
`outcome.py` decides; this module does the I/O around it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from smtpfleet.cluster.store import DeliveryBookkeeping
from smtpfleet.config import Config, RelayConfig, RetryConfig
from smtpfleet.delivery.classify import FailureKind, Outcome, Verdict
from smtpfleet.delivery.dsn import build_dsn
from smtpfleet.delivery.outcome import (
    DONE,
    Attempt,
    Finish,
    Plan,
    park,
    plan_outcome,
    set_aside,
)
from smtpfleet.envelope import Kind, NewMessage, QueuedMessage, choose_shard, new_qid, now_ms
from smtpfleet.errors import Fenced, QueueUnavailable, SpoolError
from smtpfleet.logs import info_event
from smtpfleet.metrics import Metrics
from smtpfleet.queue.classes import TrafficClasses, read_plan
from smtpfleet.queue.deliveries import Body, Delivery, DeliveryQueue
from smtpfleet.relays.clients import RelayClients
from smtpfleet.relays.ring import Ring
from smtpfleet.relays.rules import Route, Router, waiting_counter
from smtpfleet.tasks import background, cancel_all

log = logging.getLogger(__name__)

REDIS_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)
PAUSE_S = 0.1
OUTCOME_FLUSH_S = 5.0
GATE_POLL_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# Sent entries whose finish (or bounce and finish) is owed to Redis; past this, the oldest are
# forgotten (another node claimed them, or the finish landed although its reply was lost).
UNFINISHED_KEPT = 10_000


def _always() -> bool:
    return True


class DeliveryWorker:
    """This node's consumer of the queue: reads entries, sends them over the relays in each
    key's ring order, and records each outcome. Also runs the retry scheduler, the idle-entry
    safety net, and keeps the leases of its in-flight entries fresh.

    `healthy` names the relays to route over (the health monitor's set), `may_deliver` is
    False while the node is fenced, `observe` hears every attempt's verdicts (passive checks).
    """

    def __init__(
        self,
        *,
        queue: DeliveryQueue,
        ring: Ring,
        relays: RelayClients,
        config: Config,
        consumer: str,
        hostname: str,
        store: DeliveryBookkeeping,
        metrics: Metrics,
        healthy: Callable[[], set[str]] | None = None,
        may_deliver: Callable[[], bool] = _always,
        observe: Callable[[str, dict[str, Verdict]], None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._queue = queue
        self._router = Router(ring, config.relays, config.routing)
        self._store = store
        all_relays = {r.name for r in config.relays}
        self._healthy = healthy or (lambda: all_relays)
        self._may_deliver = may_deliver
        self._observe = observe
        self._load: collections.Counter[str] = collections.Counter()
        self._recent: collections.Counter[str] = collections.Counter()
        self._relays = relays
        self._config = config
        self._classes = TrafficClasses.from_config(config.queue)
        self._floor = self._classes.floor_slots(config.delivery.concurrency)
        self._consumer = consumer
        self._hostname = hostname
        self._inflight: dict[tuple[int, str, str], asyncio.Task[None]] = {}  # by Delivery.key
        self._slot_free = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._rescan = True  # read our own pending entries first (ours from before an outage)
        # Deliveries cut short by Redis in a row, and when the rescan may read them again: a
        # Redis that reads but refuses writes (full, paused, a replica) hands the same entries
        # back at once, and a rescan without a pause turned that into a hot loop.
        self._interrupted = 0
        self._rescan_at = 0.0
        # Entries sent whose finish did not reach Redis (the connection broke, a full Redis):
        # by Delivery.key, oldest first, what is owed: the Finish, or the whole Plan when its
        # bounce could not be queued either. The rescan gives them back; they are finished
        # (bounced first), not sent again.
        self._unfinished: collections.OrderedDict[tuple[int, str, str], Finish | Plan] = (
            collections.OrderedDict()
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        restarted = self._metrics.task_restarted
        self._loops = [
            background("delivery-reader", self._read_loop, restarted),
            background("retry-scheduler", self._retry_loop, restarted),
            background("idle-claimer", self._claim_loop, restarted),
            background("lease-refresher", self._lease_loop, restarted),
            background("outcome-counts", self._outcomes_loop, restarted),
        ]

    @property
    def consumer(self) -> str:
        return self._consumer

    def wants(self, lane: str) -> bool:
        """Whether the reader would read a new entry of this traffic class now: a free slot,
        a relay to send to, not fenced, nothing of our own to read again first
        (queue.LocalReader). Only the first class is taken as accepted: the others wait for
        the reader, which fills the slots in class order."""
        if self._stopping or self._rescan or not self._loops or lane != self._classes.lanes[0]:
            return False
        return self._free_slots() > 0 and self._may_deliver() and bool(self._healthy())

    def take(self, delivery: Delivery) -> None:
        """An entry our own accept read for us as it wrote it (queue.LocalReader). Once we
        are stopping it stays pending under our consumer, for whoever takes over from us."""
        if not self._stopping and delivery.key not in self._inflight:
            self._spawn(delivery)

    def _free_slots(self) -> int:
        return self._config.delivery.concurrency - len(self._inflight)

    def adopt(self, deliveries: list[Delivery]) -> None:
        """Deliver entries claimed from a dead node."""
        self._metrics.redeliveries.inc(len(deliveries))
        for delivery in deliveries:
            if delivery.key not in self._inflight:
                self._spawn(delivery)

    async def stop(self, grace_s: float) -> int:
        """Stop taking work, let deliveries in flight finish within the grace period.

        Returns how many were still running at the deadline; they are cancelled and stay
        pending in Redis, where a survivor claims them.
        """
        self._stopping = True
        await cancel_all(self._loops)
        running = list(self._inflight.values())
        if running:
            _, still = await asyncio.wait(running, timeout=grace_s)
            await cancel_all(still)
            return len(still)
        return 0

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- the loops ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        failures = 0
        while not self._stopping:
            free = self._free_slots()
            if free <= 0 or (self._rescan and self._inflight):
                await self._wait_for_slot()
                continue
            if self._rescan and (pause := self._rescan_at - time.monotonic()) > 0:
                await asyncio.sleep(pause)
                continue
            if not self._may_deliver() or not self._healthy():
                # Fenced, or no relay to send to: leave the mail in the stream, where it
                # waits at no cost (no per-message retry timers during an outage).
                await asyncio.sleep(PAUSE_S)
                continue
            try:
                batch = await self._next_batch(free)
            except QueueUnavailable as exc:
                delay = REDIS_RETRY_S[min(failures, len(REDIS_RETRY_S) - 1)]
                failures += 1
                log.warning("delivery reader: %s; retrying in %.1fs", exc, delay)
                self._rescan = True
                await asyncio.sleep(delay)
                continue
            failures = 0
            for delivery in batch:
                self._spawn(delivery)

    async def _next_batch(self, free: int) -> list[Delivery]:
        if self._rescan:
            batch = await self._queue.read_own_pending(self._consumer, free)
            batch = [d for d in batch if d.key not in self._inflight]
            if not batch:
                self._rescan = False
            return batch
        block_ms = self._config.delivery.block_ms
        if len(self._classes.lanes) == 1:
            return await self._queue.read(self._consumer, self._per_shard(free), block_ms)
        return await self._by_priority(free)

    def _per_shard(self, slots: int) -> int:
        """A read's count is per stream: spread the slots over the shards."""
        shards = self._config.redis.shards
        return min(self._config.delivery.batch, max(1, -(-slots // shards)))

    async def _by_priority(self, free: int) -> list[Delivery]:
        """Fill the free slots from the highest traffic class first, each lower class keeping
        its floor (queue/classes.py `read_plan`); wait on every class only when none had any."""
        in_flight = collections.Counter(lane for _, lane, _ in self._inflight)
        got: list[Delivery] = []
        plan = read_plan(self._classes.lanes, free, in_flight, self._floor)
        floors = len(plan) - len(self._classes.lanes)  # the lower classes' floors come first
        for step, (lane, wanted) in enumerate(plan):
            slots = min(wanted, free - len(got))
            if slots <= 0:
                continue
            count = self._per_shard(slots)
            # A lower class is read for its slots at most (a subset of the shards when they
            # are fewer than the shards): one entry per shard would overshoot them and hold
            # slots the first class needs. The first class may overshoot: it is what matters.
            limit = None if lane == self._classes.lanes[0] else slots
            batch = await self._queue.read(self._consumer, count, 0, [lane], limit)
            got.extend(batch)
            if step >= floors and _may_have_more(batch, count):
                # A read's count is per shard: a shard that gave all it was asked may hold
                # more of this class. Read it again first, before any lower class.
                break
        if got:
            return got
        block_ms = self._config.delivery.block_ms
        return await self._queue.read(self._consumer, self._per_shard(free), block_ms)

    async def _wait_for_slot(self) -> None:
        self._slot_free.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_free.wait(), timeout=1.0)

    async def _retry_loop(self) -> None:
        interval = self._config.retry.scheduler_interval_s
        while not self._stopping:
            with contextlib.suppress(QueueUnavailable):
                await self._queue.move_due_retries(now_ms())
            await asyncio.sleep(interval)

    async def _claim_loop(self) -> None:
        idle_ms = int(self._config.delivery.claim_idle_s * 1000)
        while not self._stopping:
            await asyncio.sleep(min(60.0, max(1.0, self._config.delivery.claim_idle_s / 10)))
            try:
                claimed = await self._queue.claim_idle(self._consumer, idle_ms, 100)
            except QueueUnavailable:
                continue
            for delivery in claimed:
                if delivery.key not in self._inflight:
                    log.info("claimed idle entry %s (%s)", delivery.entry_id, delivery.label)
                    self._metrics.redeliveries.inc()
                    self._spawn(delivery)

    async def _lease_loop(self) -> None:
        """Keep in-flight entries fresh so neither takeover nor the safety net can claim them."""
        while not self._stopping:
            await asyncio.sleep(self._config.cluster.lease_refresh_s)
            by_stream: dict[tuple[int, str], list[str]] = {}
            for (shard, lane, entry_id), task in list(self._inflight.items()):
                if not task.done():
                    by_stream.setdefault((shard, lane), []).append(entry_id)
            with contextlib.suppress(QueueUnavailable):
                await self._store.refresh_leases(self._consumer, by_stream)

    async def _outcomes_loop(self) -> None:
        """Share recent per-relay outcome counts, for `smtpfleet status`."""
        while not self._stopping:
            await asyncio.sleep(OUTCOME_FLUSH_S)
            counts, self._recent = self._recent, collections.Counter()
            if counts:
                try:
                    await self._store.add_outcomes(now_ms() // 60_000, counts)
                except QueueUnavailable:
                    self._recent.update(counts)

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(
            self._guarded(delivery), name=f"deliver-{delivery.shard}-{delivery.entry_id}"
        )
        self._inflight[delivery.key] = task
        task.add_done_callback(lambda _: self._done(delivery.key))

    def _done(self, key: tuple[int, str, str]) -> None:
        self._inflight.pop(key, None)
        self._slot_free.set()

    async def _guarded(self, delivery: Delivery) -> None:
        try:
            await self._handle(delivery)
            self._interrupted = 0
        except (QueueUnavailable, Fenced) as exc:
            # The entry stays pending under this consumer; the rescan picks it up again, after
            # a pause that grows while Redis keeps failing us.
            log.warning("delivery of %s interrupted: %s", delivery.label, exc)
            pause = REDIS_RETRY_S[min(self._interrupted, len(REDIS_RETRY_S) - 1)]
            self._interrupted += 1
            self._rescan_at = max(self._rescan_at, time.monotonic() + pause)
            self._rescan = True
        except Exception as exc:
            log.exception("delivery of %s failed unexpectedly", delivery.label)
            await self._set_aside(delivery, exc)

    async def _set_aside(self, delivery: Delivery, exc: Exception) -> None:
        """Retry an entry that failed unexpectedly later, with backoff: re-reading it at once
        would turn a deterministic bug into a hot loop against the queue."""
        if delivery.message is None:
            return  # left pending: the idle-claim safety net takes it again, much later
        error = f"local error: {exc.__class__.__name__}"
        retry = self._retry_for(delivery.message)
        finish = set_aside(delivery.message, error, now_ms=now_ms(), retry=retry)
        try:
            await self._queue.finish(delivery, finish)
        except Exception:  # left pending: the idle-claim safety net takes it again, much later
            log.exception("could not set %s aside", delivery.label)

    # -- one entry ---------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        owed = self._unfinished.pop(delivery.key, None)
        if owed is not None:
            try:
                await self._settle(delivery, owed)  # sent already: only its record was missing
            except QueueUnavailable:
                # Still owed, unless a part got through (the bounce, not the finish): then
                # what is left is owed already, and the bounce must not go out twice.
                if delivery.key not in self._unfinished:
                    self._owe(delivery.key, owed)
                raise
            return
        message = delivery.message
        if message is None:
            await self._queue.finish(delivery, DONE)  # deleted while pending: acknowledge it
            return
        body = await self._queue.load_body(delivery.shard, message.qid)
        if body.data is not None and not body.confirmed:
            body = await self._await_confirmation(delivery, message, body)
        if body.data is None:
            log.info("%s: cancelled before delivery (the client was told 4xx)", message.qid)
            await self._queue.finish(delivery, DONE)
            return
        attempts = await self._attempt(message, body.data)
        if attempts is None:
            await self._queue.finish(delivery, park(message, now_ms=now_ms()))
            return
        plan = plan_outcome(message, attempts, now_ms=now_ms(), retry=self._retry_for(message))
        await self._record(delivery, message, plan, body.data)

    async def _settle(self, delivery: Delivery, owed: Finish | Plan) -> None:
        """Record what an attempt came to, when Redis could not be told at the time. A bounce
        that could not be queued is queued now, from the body still in Redis, then the entry
        is finished: the recipients that took the message do not get it again."""
        message = delivery.message
        if isinstance(owed, Finish):
            await self._finish(delivery, owed)
        elif message is None:
            await self._queue.finish(delivery, DONE)  # deleted while pending: acknowledge it
        else:
            body = await self._queue.load_body(delivery.shard, message.qid)
            await self._record(delivery, message, owed, body.data or b"")

    def _retry_for(self, message: QueuedMessage) -> RetryConfig:
        """The retry schedule and lifetime of the message's traffic class."""
        return self._classes.retry_for(message.traffic_class, self._config.retry)

    async def _await_confirmation(
        self, delivery: Delivery, message: QueuedMessage, body: Body
    ) -> Body:
        """Hold an entry whose durability is not confirmed yet (WAIT/WAITAOF still running).

        If the accept fails, the body is deleted (the tombstone) and we must not send it; if
        the confirmation mark was lost in a failover, the window's end lets it go.
        """
        window_ms = self._config.queue.durability_timeout_ms + 1000
        deadline = message.accepted_ms + window_ms
        for pause in _gate_pauses():
            if now_ms() >= deadline:
                break
            await asyncio.sleep(pause)
            body = await self._queue.load_body(delivery.shard, message.qid)
            if body.data is None or body.confirmed:
                return body
        return body

    async def _attempt(self, message: QueuedMessage, data: bytes) -> dict[str, Attempt] | None:
        """Each group of recipients (per routing rule) over its own relays, in its key's
        order. None when no relay at all is healthy."""
        healthy = self._healthy()
        if not healthy:
            return None
        attempts: dict[str, Attempt] = {}
        for route in self._router.routes(message, healthy, self._load):
            if route.order:
                attempts.update(await self._through(message, route, data))
            else:
                attempts.update(self._waiting(route))
        return attempts

    def _waiting(self, route: Route) -> dict[str, Attempt]:
        """None of the relays the rule allows is healthy: these recipients wait (parked, no
        attempt counted), whatever else is healthy."""
        self._recent[waiting_counter(route.rule)] += len(route.recipients)
        verdict = Verdict(
            Outcome.TEMPORARY, FailureKind.NO_ROUTE, None, route.waiting_reason, "4.4.1"
        )
        return {recipient: Attempt(verdict, None) for recipient in route.recipients}

    async def _through(
        self, message: QueuedMessage, route: Route, data: bytes
    ) -> dict[str, Attempt]:
        """Each relay of the route in order until every recipient has a final answer
        (invariant 3)."""
        remaining = list(route.recipients)
        attempts: dict[str, Attempt] = {}
        for relay in route.order:
            if not self._may_deliver():
                # Fenced mid-delivery: leave the entry pending for whoever claims it.
                raise Fenced(f"{self._consumer} is fenced: no next relay for {message.qid}")
            verdicts = await self._send(message, relay, remaining, data)
            if self._observe is not None:
                self._observe(relay.name, verdicts)
            for recipient, verdict in verdicts.items():
                unasked = verdict.outcome is Outcome.TEMPORARY and not verdict.from_relay
                if unasked and recipient in attempts:
                    # Our own limit at this relay says nothing of the recipient: what an
                    # earlier relay of this attempt really answered (a 4xx) stands, for the
                    # backoff and the expiry DSN (else the attempt was parked, uncounted, and
                    # that relay asked again every 2 s).
                    continue
                # Only what a relay said names it as the Remote-MTA (RFC 3464 §2.3.5).
                remote = relay.host if verdict.from_relay else None
                attempts[recipient] = Attempt(verdict, remote)
            remaining = [r for r in remaining if verdicts[r].outcome is Outcome.TEMPORARY]
            if not remaining:
                break
        return attempts

    async def _send(
        self, message: QueuedMessage, relay: RelayConfig, recipients: list[str], data: bytes
    ) -> dict[str, Verdict]:
        name = relay.name
        self._load[name] += 1
        started = time.perf_counter()
        try:
            client = self._relays.client(relay)
            rank = self._classes.rank(message.traffic_class)
            verdicts = await client.send(message.sender, recipients, data, rank)
        finally:
            self._load[name] -= 1
        elapsed = time.perf_counter() - started
        self._metrics.child(self._metrics.attempt_seconds, name).observe(elapsed)
        age_s = max(0.0, (now_ms() - message.accepted_ms) / 1000)
        for verdict in verdicts.values():
            self._metrics.child(self._metrics.deliveries, name, verdict.kind.value).inc()
            self._recent[f"{name}|{verdict.kind.value}"] += 1
            if verdict.outcome is Outcome.DELIVERED:
                self._metrics.delivery_latency.observe(age_s)
                klass = self._classes.name_of(message.traffic_class)
                self._metrics.child(self._metrics.class_latency, klass).observe(age_s)
        info_event(
            log,
            "delivery attempt",
            {
                "event": "delivery.attempt",
                "qid": message.qid,
                "relay": name,
                "codes": sorted({v.code or 0 for v in verdicts.values()}),
                "outcomes": sorted({v.kind.value for v in verdicts.values()}),
                "recipients": len(recipients),
                "seconds": round(elapsed, 4),
            },
        )
        return verdicts

    async def _record(
        self, delivery: Delivery, message: QueuedMessage, plan: Plan, data: bytes
    ) -> None:
        if plan.bounce:
            try:
                await self._bounce(message, plan, data)
            except QueueUnavailable:
                self._owe(delivery.key, plan)  # the bounce, then the finish
                raise
            self._metrics.bounces.inc()
        elif plan.failed:
            self._metrics.dead_letters.inc(len(plan.failed))
        await self._finish(delivery, plan.finish)
        # The delivery.attempt event already tells a plain success; say more only otherwise.
        log.log(
            logging.INFO if plan.failed or plan.retry else logging.DEBUG,
            "%s: delivered=%d failed=%d retry=%d",
            message.qid,
            len(plan.delivered),
            len(plan.failed),
            len(plan.retry.recipients) if plan.retry else 0,
        )

    async def _finish(self, delivery: Delivery, finish: Finish) -> None:
        """Record what the attempts came to. When Redis cannot be told (a connection reset,
        a BUSY script), the entry stays pending under us and the rescan hands it back: it
        is then finished with what we know, where it used to be sent again (up to three
        copies under repeated resets). Retrying is safe: the script acknowledges, deletes
        and schedules by key; the bounce went out before and is not repeated."""
        try:
            await self._queue.finish(delivery, finish)
        except QueueUnavailable:
            self._owe(delivery.key, finish)
            raise

    def _owe(self, key: tuple[int, str, str], owed: Finish | Plan) -> None:
        self._unfinished[key] = owed
        while len(self._unfinished) > UNFINISHED_KEPT:  # finished after all, or claimed
            self._unfinished.popitem(last=False)

    async def _bounce(self, message: QueuedMessage, plan: Plan, data: bytes) -> None:
        """Queue the DSN before acknowledging the original, so a crash cannot lose both."""
        dsn = build_dsn(
            original_sender=message.sender,
            original_qid=message.qid,
            failures=plan.failed,
            reporting_mta=self._hostname,
            original_data=data,
            arrival_ms=message.accepted_ms,
            now_ms=now_ms(),
            from_address=self._config.bounce.from_address,
            expired=plan.expired,
        )
        qid = new_qid(choose_shard(None, self._config.redis.shards))
        # The DSN waits in the class of the mail it reports on: expiring bulk mail must not
        # flood the transactional class with its bounces.
        bounce = NewMessage(
            qid=qid,
            sender="",
            recipients=(message.sender,),
            data=dsn,
            kind=Kind.DSN,
            traffic_class=self._classes.name_of(message.traffic_class),
        )
        try:
            await self._queue.enqueue(bounce)
        except SpoolError as exc:
            raise QueueUnavailable(f"could not queue the DSN for {message.qid}: {exc}") from exc


def _may_have_more(batch: list[Delivery], count: int) -> bool:
    per_shard = collections.Counter(d.shard for d in batch)
    return any(n >= count for n in per_shard.values())


def _gate_pauses() -> Iterator[float]:
    yield from GATE_POLL_S
    while True:
        yield GATE_POLL_S[-1]
