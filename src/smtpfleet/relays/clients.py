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

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Verdict]:
        """A verdict per recipient. Never raises for relay trouble: that is a verdict too."""
        ...


class RelayClients(Protocol):
    """A client per relay."""

    def client(self, relay: RelayConfig) -> MessageSender:
        """The client of this relay (made on first use)."""
        ...
