"""The node-wide budget of message bytes being received. Pure.

Every session in DATA holds the bytes it has read so far until its message is queued or
refused. Without a shared cap a burst of large messages (four 20 MB messages at once took a
node from 56 MB to 275 MB) grows the node until the kernel kills it, taking every session
with it; with one, the message that would exceed it is refused with a temporary reply and
the client tries again later (RFC 5321 §4.2.5: 452, insufficient system storage).
"""

from __future__ import annotations


class ByteBudget:
    """A counter of bytes held, with a limit; `take` never lets it pass the limit."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the budget must be positive")
        self.limit = limit
        self.held = 0
        self.refusals = 0  # how often a take was refused

    @property
    def available(self) -> int:
        return self.limit - self.held

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, or refuse and hold nothing."""
        if size > self.available:
            self.refusals += 1
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
