"""Compare what a cluster accepted (250) with what the sinks received."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smtpfleet.loadgen.messages import RECIPIENT, tag_of

if TYPE_CHECKING:
    from smtpfleet.testing.sink import Sink

LATE_DUPLICATES_S = 0.5  # after the last delivery, how long a late duplicate may take
SETTLE_POLL_S = 0.1


@dataclass
class Reconciliation:
    accepted: int
    delivered: int
    lost: list[str]  # got 250, never delivered
    duplicated: dict[str, int]  # delivered more than once
    misrouted: list[str]  # delivered to a recipient that was not the one sent to
    unexpected: int  # delivered, but never accepted in this run (or not ours at all)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.misrouted)

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "duplicated": sum(n - 1 for n in self.duplicated.values()),
            "misrouted": len(self.misrouted),
            "unexpected": self.unexpected,
            "lost_examples": self.lost[:10],
        }


def reconcile(
    accepted: Iterable[str], delivered: Iterable[tuple[str | None, Sequence[str]]]
) -> Reconciliation:
    """Compare the tags that got 250 with what the sinks received (tag, recipients)."""
    wanted = set(accepted)
    seen: collections.Counter[str] = collections.Counter()
    misrouted, unexpected, count = [], 0, 0
    for tag, recipients in delivered:
        count += 1
        if tag is None or tag not in wanted:
            unexpected += 1
            continue
        seen[tag] += 1
        if list(recipients) != [RECIPIENT]:
            misrouted.append(tag)
    return Reconciliation(
        accepted=len(wanted),
        delivered=count,
        lost=sorted(wanted - set(seen)),
        duplicated={t: n for t, n in seen.items() if n > 1},
        misrouted=misrouted,
        unexpected=unexpected,
    )


async def settle(
    accepted: Sequence[str],
    sinks: Sequence[Sink],
    settle_s: float,
    stop: asyncio.Event | None = None,
) -> Reconciliation:
    """Reconcile once every accepted message arrived at the sinks, or settle_s ran out, or
    `stop` was set (Ctrl-C: the caller knows the count is then incomplete)."""
    deadline = time.monotonic() + settle_s
    while True:
        recon = reconcile(accepted, delivered(sinks))
        if stop is not None and stop.is_set():
            return recon
        if not recon.lost or time.monotonic() >= deadline:
            await asyncio.sleep(LATE_DUPLICATES_S)  # late duplicates show up here
            return reconcile(accepted, delivered(sinks))
        await asyncio.sleep(SETTLE_POLL_S)


def delivered(sinks: Sequence[Sink]) -> list[tuple[str | None, tuple[str, ...]]]:
    """(tag, recipients) of every message the sinks accepted."""
    return [(tag_of(m.data), m.recipients) for s in sinks for m in s.messages]
