"""Pure measurements over what the senders saw and what the relays received (plain values in,
numbers out), so each one is unit-tested apart from any cluster."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from smtpfleet.loadgen.paced import Sent

TAKEOVERS_METRIC = b"smtpfleet_takeovers_total"
# What cluster/membership.py logs when it judges a node dead (a takeover, or a removal).
DECLARED_DEAD = re.compile(r"dead node (\S+?)[\s\"(]")


class Counted(Protocol):
    @property
    def t(self) -> float: ...
    @property
    def delivered(self) -> int: ...
    @property
    def accepted(self) -> int: ...


def _finished(sent: Sent) -> float:
    return sent.done if sent.done is not None else sent.at + sent.latency_s


def accept_rto_s(sent: Sequence[Sent], start: float, inject_s: float) -> float | None:
    """Inject until the fleet accepts again for good: the first 250 that came after the last
    refusal. 0 when nobody was refused after the inject; None when nothing was accepted after
    the last refusal (the fleet never came back while the load ran)."""
    refused = [_finished(s) - start for s in sent if s.code != 250 and s.at - start >= inject_s]
    if not refused:
        return 0.0
    last = max(refused)
    back = [_finished(s) - start for s in sent if s.code == 250 and _finished(s) - start > last]
    return round(min(back) - inject_s, 2) if back else None


def refusal_window_s(sent: Sequence[Sent], start: float, inject_s: float) -> float:
    """From the first refused attempt after the inject to the last refusal's reply: how long
    senders were told to come back later (451/421), or could not connect at all."""
    refused = [s for s in sent if s.code != 250 and s.at - start >= inject_s]
    if not refused:
        return 0.0
    return round(max(_finished(s) for s in refused) - min(s.at for s in refused), 2)


def in_flight_max(samples: Sequence[Counted], from_s: float, to_s: float) -> int:
    """The most messages accepted but not yet delivered at any sample inside the window: what a
    fault there could catch in flight, and so what duplicates may reach."""
    inside = [s.accepted - s.delivered for s in samples if from_s <= s.t <= to_s]
    return max([0, *inside])


def duplicates(deliveries: Mapping[str, int], own_tags: Iterable[str]) -> int:
    """Deliveries beyond the first of this drill's own messages: a running cluster's relays
    keep what earlier drills sent, and their duplicates are not this drill's."""
    return sum(deliveries[tag] - 1 for tag in set(own_tags) if deliveries.get(tag, 0) > 1)


def takeovers_in(metrics_text: bytes) -> int:
    """`smtpfleet_takeovers_total` from one node's /metrics page (0 when absent)."""
    for line in metrics_text.splitlines():
        if line.startswith(TAKEOVERS_METRIC):
            return int(float(line.split()[-1]))
    return 0


def declared_dead(log_lines: Iterable[str], alive: set[str]) -> int:
    """How often a node's log says it judged dead a node that in fact never stopped."""
    return sum(1 for line in log_lines if (m := DECLARED_DEAD.search(line)) and m.group(1) in alive)
