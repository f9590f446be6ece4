"""Traffic classes (`queue.classes`): which class a message is in, and which class a worker
reads first. Pure.

Each class has streams and retry sets of its own in every shard (queue/keys.py). Entries name
their class by its *lane*: "" for the default class, whose keys are the unsuffixed ones of a
queue without classes, else the class's name. With no classes configured there is one lane,
"", and everything is as it was.

Priority (`read_plan`): a worker fills its free delivery slots from the highest class first
and takes a lower class only for what is left, except that each lower class may always keep
`class_share` of the node's slots busy, so a flood of transactional mail slows bulk mail down
but never stops it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from smtpfleet.config import QueueConfig, RetryConfig, TrafficClassConfig
from smtpfleet.relays.rules import domain_matches, domain_of

DEFAULT_LANE = ""  # the default class's lane: today's keys
UNNAMED = "default"  # the one class of a queue without `queue.classes`, in metrics and status


@dataclass(frozen=True)
class TrafficClasses:
    """The configured classes, highest priority first, and the decisions made with them."""

    classes: tuple[TrafficClassConfig, ...]
    default: str  # the default class's name
    share: float

    @classmethod
    def from_config(cls, queue: QueueConfig) -> TrafficClasses:
        classes = tuple(queue.classes)
        default = queue.default_class or (classes[0].name if classes else UNNAMED)
        return cls(classes, default, queue.class_share)

    @property
    def lanes(self) -> tuple[str, ...]:
        """Every class's lane, highest priority first."""
        if not self.classes:
            return (DEFAULT_LANE,)
        return tuple(self.lane_of(c.name) for c in self.classes)

    def lane_of(self, name: str) -> str:
        return DEFAULT_LANE if name == self.default else name

    def rank(self, lane: str) -> int:
        """The class's place in the priority order (0: first); an unknown lane: last."""
        lanes = self.lanes
        return lanes.index(lane) if lane in lanes else len(lanes)

    def name_of(self, lane: str) -> str:
        """The class an entry's lane stands for (an unknown lane: the name itself)."""
        return self.default if lane == DEFAULT_LANE else lane

    def choose(self, sender: str, tenant: str | None, requested: str | None) -> str:
        """The lane of a new message: the class a trusted header asked for, when it is one
        of ours; else the first class (in priority order) whose conditions match; else the
        default class. A class without conditions is chosen only by the header."""
        names = {c.name for c in self.classes}
        if requested is not None and requested.strip().lower() in names:
            return self.lane_of(requested.strip().lower())
        for klass in self.classes:
            if _matches(klass, sender, tenant):
                return self.lane_of(klass.name)
        return DEFAULT_LANE

    def retry_for(self, lane: str, base: RetryConfig) -> RetryConfig:
        """The retry schedule and lifetime of the class: `retry.*` with the class's overrides."""
        name = self.name_of(lane)
        for klass in self.classes:
            if klass.name == name:
                overrides = klass.retry.model_dump(exclude_none=True)
                return base.model_copy(update=overrides) if overrides else base
        return base

    def floor_slots(self, concurrency: int) -> int:
        """The delivery slots each lower class may fill whatever waits above it."""
        return max(1, math.floor(self.share * concurrency)) if self.share > 0 else 0


def _matches(klass: TrafficClassConfig, sender: str, tenant: str | None) -> bool:
    """Either condition places mail in the class: a class is a kind of mail (a newsletter
    domain, a marketing tenant), not a route that all conditions must narrow down."""
    if klass.sender_domains and domain_matches(domain_of(sender), klass.sender_domains):
        return True
    return tenant is not None and tenant in klass.tenants


def read_plan(
    lanes: tuple[str, ...], free: int, in_flight: Mapping[str, int], floor: int
) -> list[tuple[str, int]]:
    """The reads that fill `free` delivery slots, in order: (lane, at most this many).

    First each lower class still below its floor, for the gap; then every class in priority
    order for whatever is still free (the caller stops when nothing is).
    """
    steps = []
    for lane in lanes[1:]:
        gap = min(free, floor - in_flight.get(lane, 0))
        if gap > 0:
            steps.append((lane, gap))
    steps.extend((lane, free) for lane in lanes)
    return steps
