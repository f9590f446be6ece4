"""The one thing inbound needs from the queue. Inbound imports this, never redis."""

from __future__ import annotations

from typing import Protocol

from smtpfleet.envelope import EnqueueResult, NewMessage


class Spool(Protocol):
    """Durable acceptance of one message: what inbound calls before it answers 250."""

    async def enqueue(self, message: NewMessage) -> EnqueueResult:
        """Store the message durably, or raise.

        Raises QueueUnavailable (Redis down, slow, durability not confirmed) or QueueFull
        (above the high-water mark); both map to 4xx replies. Returning means `250` is safe.
        """
        ...
