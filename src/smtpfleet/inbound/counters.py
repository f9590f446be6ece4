"""What inbound needs to count per client: sessions, messages and recipients, this node's or
the cluster's.

A protocol of its own, so the Redis implementation (queue/client_limits.py) and inbound meet
here and in node.py, never in each other. The decisions on the counts are inbound/limits.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from smtpfleet.inbound.limits import Usage


class ClientCounter(Protocol):
    """Sessions open now and use of the last minute, per client (see `limits.client_key`)."""

    async def open_session(self, client: str, token: str) -> int:
        """Count one more session of the client; its sessions now, this one included."""
        ...

    async def close_session(self, client: str, token: str, recipients: int) -> None:
        """The session ended; `recipients` it accepted that no call has counted yet."""
        ...

    async def add_message(self, client: str, recipients: int) -> Usage:
        """Count one MAIL, and `recipients` accepted since the last count of this session;
        the client's use of the last minute, this MAIL included."""
        ...
