"""One node's SMTP front in-process, over an in-memory spool: for tests of what is on the wire.

The spool is our own `Spool` protocol in memory, so a test sees exactly what inbound would
hand to the queue (and no Redis is needed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from smtpfleet.config import InboundConfig
from smtpfleet.envelope import EnqueueResult, NewMessage
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.policy import RecipientPolicy
from smtpfleet.inbound.server import InboundServer
from smtpfleet.metrics import Metrics


@dataclass
class MemorySpool:
    """Accepted messages, in order, with faults on demand."""

    messages: list[NewMessage] = field(default_factory=list)
    fail_with: Exception | None = None  # raised by every enqueue
    delay_s: float = 0.0  # before each enqueue completes (3600: a queue that hangs)
    duplicate_of: str | None = None  # answer every enqueue as a duplicate of this qid
    cancelled: int = 0  # enqueues cancelled while waiting
    started: int = 0  # enqueues begun (in flight or done)

    async def enqueue(self, message: NewMessage) -> EnqueueResult:
        self.started += 1
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_with is not None:
            raise self.fail_with
        if self.duplicate_of is not None:
            return EnqueueResult(self.duplicate_of, duplicate=True)
        self.messages.append(message)
        return EnqueueResult(message.qid)


@dataclass
class Front:
    server: InboundServer
    spool: MemorySpool
    metrics: Metrics

    def address(self, listener: int = 0) -> tuple[str, int]:
        return self.server.addresses[listener]

    def sample(self, name: str, labels: Mapping[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, dict(labels)) or 0.0


@asynccontextmanager
async def inbound_front(
    settings: Mapping[str, Any], spool: MemorySpool | None = None
) -> AsyncIterator[Front]:
    """An `InboundServer` for `inbound:` settings (listen on port 0), started and closed."""
    config = InboundConfig.model_validate(settings)
    spool, metrics = spool or MemorySpool(), Metrics()
    handler = InboundHandler(
        spool=spool,
        policy=RecipientPolicy.from_config(config),
        hostname="mx.test",
        shards=4,
        max_recipients=config.max_recipients,
        max_received_headers=config.max_received_headers,
        accept_timeout_s=config.accept_timeout_s,
        metrics=metrics,
    )
    server = InboundServer(config, handler, "mx.test", metrics=metrics)
    await server.start()
    try:
        yield Front(server, spool, metrics)
    finally:
        await server.close()
