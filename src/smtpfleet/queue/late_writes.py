"""An accept's write that reaches Redis after the client was answered `451` is not applied.

RFC 5321 §4.2.5: after a 4xx to the final dot the message must not be delivered. When Redis
stalls rather than goes away (a stopped or swapping process, a long fork, a frozen VM), an
accept's script sits in its socket; the node gives up and answers `451`, and its tombstone
cannot land either, since Redis is not answering. When Redis resumes it runs the script after
the `451`, and the copy was delivered: a second one once the sender retried. So the script
carries a deadline in Redis's clock and refuses itself past it (`scripts.ENQUEUE`).

Redis's clock is learnt from accepts: the milliseconds of an entry id are Redis's time when
its script ran, which was after the accept began here, so `id_ms - began_ms` bounds how far
Redis's clock is ahead of ours from above. Translated with that bound, a deadline is never
early in Redis's clock: a script refused as late ran after the node gave up. The tightest of
the recent bounds is used; a script refused as late brings Redis's time back, and the bounds
start again from it, so a clock that jumped costs one `451`, not a run of them.
"""

from __future__ import annotations

import collections
from typing import Final

RECENT: Final = 32  # bounds kept; the tightest wins (an accept that waited gives a loose one)
SLACK_MS: Final = 100  # the clocks' drift between bounds, and ids' whole milliseconds


class RedisClock:
    """How far Redis's clock runs ahead of ours, at most (milliseconds; negative: behind)."""

    def __init__(self) -> None:
        self._bounds: collections.deque[int] = collections.deque(maxlen=RECENT)

    def observe(self, began_ms: int, redis_ms: int) -> None:
        """A script that ran at `redis_ms` (Redis's clock) for an accept begun at `began_ms`."""
        self._bounds.append(redis_ms - began_ms)

    def restart(self, began_ms: int, redis_ms: int) -> None:
        """A script refused as late: the bounds kept may be wrong (a clock jumped)."""
        self._bounds.clear()
        self.observe(began_ms, redis_ms)

    def deadline(self, local_ms: int) -> int | None:
        """`local_ms` of our clock in Redis's, late rather than early; None before any bound."""
        if not self._bounds:
            return None
        return local_ms + min(self._bounds) + SLACK_MS
