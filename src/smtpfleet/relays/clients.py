"""What the delivery worker needs from the relays: a client per relay that sends one message.

`RelayPool` (relays/pool.py) implements it with pooled aiosmtplib sessions;
`smtpfleet.testing.memory.ScriptedRelays` with scripted verdicts, for unit tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from smtpfleet.config import RelayConfig
from smtpfleet.delivery.classify import Verdict


class MessageSender(Protocol):
    """One relay's client."""

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, priority: int = 0
    ) -> dict[str, Verdict]:
        """A verdict per recipient. Never raises for relay trouble: that is a verdict too.
        `priority`: the message's traffic class rank (0: the first class), for the relay's
        shared limits: a higher class waits less for a connection and for the rate budget."""
        ...


class RelayClients(Protocol):
    """A client per relay."""

    def client(self, relay: RelayConfig) -> MessageSender:
        """The client of this relay (made on first use)."""
        ...
