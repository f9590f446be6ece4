"""What inbound needs to count failed AUTH attempts: this node's count, or the cluster's.

A protocol of its own, so the Redis implementation (queue/auth_failures.py) and inbound meet
here and in node.py, never in each other.
"""

from __future__ import annotations

from typing import Protocol


class FailureCounter(Protocol):
    """Failed AUTH attempts per client within a window (this node's, or the cluster's)."""

    async def failures(self, client: str) -> int: ...

    async def add_failure(self, client: str) -> int:
        """Count one more; returns the count within the window, this one included."""
        ...
