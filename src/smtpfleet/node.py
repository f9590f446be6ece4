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

from smtpfleet.config import Config
from smtpfleet.delivery.sender import Sender
from smtpfleet.delivery.worker import DeliveryWorker
from smtpfleet.errors import QueueUnavailable, RedisUnsuitable
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.policy import RecipientPolicy
from smtpfleet.inbound.server import InboundServer
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.relays.pool import RelayPool

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.node.id or f"{socket.gethostname()}-{os.getpid()}"
        self.hostname = config.node.hostname or socket.getfqdn()
        self.queue = RedisQueue(config.redis, config.queue)
        self._sender = Sender(config.delivery, config.delivery.helo_name or self.hostname)
        self.worker = DeliveryWorker(
            queue=self.queue,
            pool=RelayPool(config.relays),
            sender=self._sender,
            config=config,
            consumer=self.node_id,
            hostname=self.hostname,
        )
        self.inbound = InboundServer(config.inbound, self._handler(), self.hostname)
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
        )

    async def start(self) -> None:
        version = await self._wait_for_redis()
        await self.queue.ensure_groups()
        self.worker.start()
        await self.inbound.start()
        log.info(
            "node %s ready: smtp %s, redis %s (server %s), %d relays",
            self.node_id,
            ", ".join(f"{h}:{p}" for h, p in self.inbound.addresses),
            self.config.redis.url.rsplit("@", 1)[-1],
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
                if time.monotonic() >= deadline:
                    raise QueueUnavailable(f"Redis not reachable at start: {exc}") from exc
                log.warning("waiting for Redis: %s", exc)
                await asyncio.sleep(1.0)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting (421 4.3.2), finish what is in flight, close everything."""
        if self.draining:
            return
        self.draining = True
        grace = self.config.node.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self.inbound.start_draining()
        await self.inbound.wait_idle(grace)
        left = await self.worker.stop(max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("drain: %d deliveries cut off; they stay pending for a survivor", left)
        await self.close()

    async def close(self) -> None:
        await self.worker.stop(0.0)
        await self.inbound.close()
        await self._sender.close()
        await self.queue.close()
