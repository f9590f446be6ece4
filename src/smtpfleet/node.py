"""One node: the one place that wires the concrete pieces together.

Lifecycle (STYLE.md habit 5): connect Redis and check it can hold mail, create the consumer
groups, start delivery, then open the SMTP listeners; on drain, stop accepting (421), let
sessions and deliveries finish within the grace period, close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from prometheus_client import CollectorRegistry

from smtpfleet import memory
from smtpfleet.cluster.drift import fingerprint, routing_sections
from smtpfleet.cluster.membership import Membership
from smtpfleet.config import Config
from smtpfleet.delivery.worker import DeliveryWorker
from smtpfleet.envelope import EntryState, now_ms
from smtpfleet.errors import QueueUnavailable, RedisAccessDenied, RedisUnsuitable
from smtpfleet.fdlimit import raise_fd_limit
from smtpfleet.health.checker import HealthMonitor
from smtpfleet.http import HttpServer
from smtpfleet.inbound.auth import LocalFailureCounter
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.limits import LocalClientCounter
from smtpfleet.inbound.policy import RecipientPolicy
from smtpfleet.inbound.server import InboundServer
from smtpfleet.inbound.signing import DkimSigner
from smtpfleet.metrics import Metrics
from smtpfleet.queue.auth_failures import RedisFailureCounter
from smtpfleet.queue.client_limits import RedisClientCounter
from smtpfleet.queue.connection import access_denied
from smtpfleet.queue.deliveries import Delivery
from smtpfleet.queue.redis_cluster import ClusterStore
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.relays.pool import RelayPool
from smtpfleet.relays.ring import Ring
from smtpfleet.tasks import background, cancel_all

log = logging.getLogger(__name__)

QUEUE_STATS_INTERVAL_S = 5.0


class Node:
    """One smtpfleet node: the one place that builds the concrete pieces (RedisQueue,
    ClusterStore, RelayPool, Membership, HealthMonitor, DeliveryWorker, the SMTP and HTTP
    listeners) and runs their lifecycle: `start`, `drain` (421 to new sessions, finish
    in-flight work within the grace period), `close`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.node.id or f"{socket.gethostname()}-{os.getpid()}"
        self.hostname = config.node.hostname or socket.getfqdn()
        helo = config.delivery.helo_name or self.hostname
        self.drain_requested = asyncio.Event()  # `smtpfleet node drain ID`
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.queue = RedisQueue(
            config.redis,
            config.queue,
            observe_batch=self.metrics.observe_batch,
            accept_timeout_s=config.inbound.accept_timeout_s,
        )
        self.store = ClusterStore(self.queue)
        self._relays = RelayPool(
            config.delivery,
            helo,
            limits=self.store,
            owner=self.node_id,
            on_tls=self.metrics.outbound_tls,
            on_chained=self.metrics.chained,
            on_reply_lost=self.metrics.reply_lost,
            lease_ttl_s=config.cluster.lease_s,
            paused=lambda relay: relay in self.health.paused,
        )
        self.membership = Membership(
            store=self.store,
            config=config.cluster,
            node_id=self.node_id,
            adopt=self._adopt,
            metrics=self.metrics,
            on_drain_request=self.drain_requested.set,
            fingerprint=fingerprint(routing_sections(config)),
        )
        self.health = HealthMonitor(
            relays=config.relays,
            config=config.health,
            store=self.store,
            node_id=self.node_id,
            helo=helo,
            live_nodes=lambda: self.membership.live,
            metrics=self.metrics,
        )
        ring = Ring(
            config.relays,
            load_factor=config.routing.load_factor,
            warm_percent=config.routing.warm_percent,
            region=config.node.region,
        )
        self.worker = DeliveryWorker(
            queue=self.queue,
            ring=ring,
            relays=self._relays,
            config=config,
            consumer=self.node_id,
            hostname=self.hostname,
            store=self.store,
            healthy=lambda: self.health.healthy,
            may_deliver=lambda: not self.membership.fenced,
            observe=self.health.record,
            metrics=self.metrics,
        )
        self.queue.hand_over_to(self.worker)  # accepts read their own entries for it
        self._tasks: list[asyncio.Task[None]] = []
        self.http: HttpServer | None = None
        if config.http.listen:
            self.http = HttpServer(
                config.http, registry=self.registry, not_ready_reason=self.not_ready_reason
            )
        self._started = False
        self.signer = DkimSigner(config.dkim, self.metrics) if config.dkim.keys else None
        window_s = config.inbound.auth.failure_window_s
        limits = config.inbound.limits
        self.client_counter = RedisClientCounter(
            self.queue.client,
            self.queue.keys,
            owner=self.node_id,
            lease_s=limits.session_lease_s,
            fallback=LocalClientCounter(now_ms),
            metrics=self.metrics,
            timeout_s=limits.redis_timeout_s,
        )
        self.inbound = InboundServer(
            config.inbound,
            self._handler(),
            self.hostname,
            metrics=self.metrics,
            auth_failures=RedisFailureCounter(
                self.queue.client,
                self.queue.keys,
                window_s=window_s,
                fallback=LocalFailureCounter(window_s),
            ),
            client_counter=self.client_counter,
        )
        self.draining = False

    def _handler(self) -> InboundHandler:
        inbound = self.config.inbound
        return InboundHandler(
            spool=self.queue,
            policy=RecipientPolicy(inbound.accepted_domains, inbound.relay_networks),
            hostname=self.hostname,
            shards=self.config.redis.shards,
            max_recipients=inbound.max_recipients,
            max_received_headers=inbound.max_received_headers,
            accept_timeout_s=inbound.accept_timeout_s,
            metrics=self.metrics,
            signer=self.signer,
            fenced=lambda: self.membership.fenced,
            tenant_header=self.config.routing.tenant_header,
            class_header=self.config.queue.class_header,
        )

    async def start(self) -> None:
        raise_fd_limit(self.config)  # before any listener or pool opens a descriptor
        if self.signer is not None:
            self.signer.load()  # a key that cannot be used stops the start (ConfigError)
        version = await self._wait_for_redis()
        await self.queue.ensure_groups()
        await self.membership.tick()  # registered before we take any work
        restarted = self.metrics.task_restarted
        self._tasks = [
            background("membership", self.membership.run, restarted),
            background("relay-sessions", self._relays.maintain_forever, restarted),
            background("queue-stats", self._export_queue_stats, restarted),
            background("memory-trim", memory.trim_forever, restarted),
            background("client-limits", self.client_counter.run, restarted),
        ]
        await self.health.check_once()  # a first view, so a dead relay is not tried first
        self._tasks.append(background("health", self.health.run, restarted))
        self.worker.start()
        if self.http is not None:
            await self.http.start()
        await self.inbound.start()
        self._started = True
        log.info(
            "node %s ready: smtp %s, redis %s (server %s), %d relays",
            self.node_id,
            ", ".join(f"{h}:{p}" for h, p in self.inbound.addresses),
            self.config.redis.describe(),
            version,
            len(self.config.relays),
        )

    async def _wait_for_redis(self) -> str:
        """Redis may start after us (compose, k8s); an unsuitable Redis fails at once."""
        deadline = time.monotonic() + self.config.node.startup_timeout_s
        while True:
            try:
                return await self.queue.check_server()
            except RedisUnsuitable:
                raise
            except QueueUnavailable as exc:
                denied = access_denied(exc)
                if denied is not None:  # a wrong password or CA does not fix itself
                    raise RedisAccessDenied(f"{self.config.redis.describe()}: {denied}") from exc
                if time.monotonic() >= deadline:
                    raise QueueUnavailable(f"Redis not reachable at start: {exc}") from exc
                log.warning("waiting for Redis: %s", exc)
                await asyncio.sleep(1.0)

    async def _export_queue_stats(self) -> None:
        while True:
            try:
                stats = await self.queue.stats(int(time.time() * 1000))
            except QueueUnavailable:
                stats = {}
            for state in EntryState:
                if state in stats:
                    self.metrics.queue.labels(state.value).set(stats[state])
            if "oldest_age_s" in stats:
                self.metrics.oldest.set(stats["oldest_age_s"])
            await self._export_class_stats()
            await asyncio.sleep(QUEUE_STATS_INTERVAL_S)

    async def _export_class_stats(self) -> None:
        try:
            by_class = await self.queue.class_stats(int(time.time() * 1000))
        except QueueUnavailable:
            return
        for name, figures in by_class.items():
            for state, value in figures.items():
                if state == "oldest_age_s":
                    self.metrics.class_oldest.labels(name).set(value)
                else:
                    self.metrics.class_queue.labels(name, state).set(value)

    def not_ready_reason(self) -> str | None:
        """Why this node should get no new SMTP connections now, or None."""
        if not self._started:
            return "starting"
        if self.draining:
            return "draining"
        if self.membership.fenced:
            if self.membership.redis_full:
                return "Redis full (maxmemory): it refuses writes"
            return "Redis unreachable"
        # No healthy relay is not a reason: mail is still accepted and waits in the queue.
        return None

    def _adopt(self, deliveries: list[Delivery]) -> None:
        if not self.draining:
            self.worker.adopt(deliveries)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting (421 4.3.2), finish what is in flight, close everything."""
        if self.draining:
            return
        self.draining = True
        self.membership.role = "draining"
        grace = self.config.node.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self.inbound.start_draining()
        await self.inbound.wait_idle(grace)
        left = await self.worker.stop(max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("drain: %d deliveries cut off; they stay pending for a survivor", left)
        await self._stop_tasks()
        await self.membership.leave()
        await self.close()

    async def _stop_tasks(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self._stop_tasks()
        await self.worker.stop(0.0)
        await self.inbound.close()
        await self.client_counter.close()
        await self._relays.close()
        await self.queue.close()
