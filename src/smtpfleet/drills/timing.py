"""A drill's phases and its load: how long each phase lasts, how fast and how large the mail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SAMPLE_S = 0.25  # how often the drill samples what was accepted and delivered


@dataclass(frozen=True)
class Timing:
    """The phases, and the load: `rate` messages per second of `size` bytes, each over a
    fresh session (as MTAs send), to a cluster of `nodes` (local clusters only)."""

    warmup_s: float = 4.0
    fault_s: float = 4.0
    recovery_s: float = 5.0
    settle_s: float = 30.0
    rate: float = 40.0
    size: int = 2048
    nodes: int = 3
    # Set: measure what the cluster carries first (PEAK_S of unpaced load, a fresh session
    # per message as the drill sends) and run at this fraction of it instead of `rate`.
    rate_fraction: float | None = None

    @classmethod
    def short(cls) -> Timing:
        return cls(warmup_s=3.0, fault_s=3.0, recovery_s=4.0, settle_s=25.0, rate=30.0)

    @classmethod
    def lasting(cls, duration_s: float, **load: Any) -> Timing:
        """Phases for a drill whose load runs `duration_s`: a quarter of warm-up (at least
        3 s, for the baseline), a third of fault, the rest to recover; settling scales too."""
        warmup = max(3.0, duration_s / 4)
        fault = max(2.0, duration_s / 3)
        recovery = max(3.0, duration_s - warmup - fault)
        return cls(warmup, fault, recovery, settle_s=max(30.0, duration_s), **load)
