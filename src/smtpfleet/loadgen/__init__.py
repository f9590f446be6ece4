"""Load generation, in one place: the fast generator behind `smtpfleet loadtest` and the
benchmarks (`generator`), the paced failover load of the drills (`paced`), the tagged
messages both send (`messages`), and the reconciliation of what was accepted with what the
sinks received (`reconcile`)."""

from smtpfleet.loadgen.generator import LoadResult, run_load
from smtpfleet.loadgen.messages import RECIPIENT, SENDER, TAG_DOMAIN, message_bytes, tag_of
from smtpfleet.loadgen.paced import PacedLoad, Sent
from smtpfleet.loadgen.reconcile import Reconciliation, delivered, reconcile, settle

__all__ = [
    "RECIPIENT",
    "SENDER",
    "TAG_DOMAIN",
    "LoadResult",
    "PacedLoad",
    "Reconciliation",
    "Sent",
    "delivered",
    "message_bytes",
    "reconcile",
    "run_load",
    "settle",
    "tag_of",
]
