"""Every Prometheus metric a node exports, on one injected registry.

Label values come from fixed sets (reply classes, outcome kinds, configured relay names),
never from message text, so cardinality stays bounded.

Cluster-wide gauges (queue depth, oldest message, live nodes) are read from Redis and every
node exports the same value: aggregate them with `max`, never `sum` (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GC_GENERATIONS = ("0", "1", "2")  # Python's collector: youngest to full
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})


def tls_version(version: str | None) -> str:
    """A bounded label value for a negotiated TLS version ("none": no handshake)."""
    if version is None:
        return "none"
    return version if version in TLS_VERSIONS else "other"


def reply_class(reply: str) -> str:
    return f"{reply[:1]}xx" if reply[:1] in "2345" and reply[:1] else "other"


class Metrics:
    """Every series a node exports, on one registry; required wherever a series is written, so
    none goes to a registry nobody scrapes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Counter(
            "smtpfleet_smtp_sessions", "SMTP sessions by result", ["result"], registry=r
        )
        self.messages = Counter(
            "smtpfleet_smtp_messages",
            "Messages offered at the final dot, by result",
            ["result"],
            registry=r,
        )
        self.lines_folded = Counter(
            "smtpfleet_smtp_lines_folded",
            "Folds inserted at accept into message lines over 998 octets",
            registry=r,
        )
        self.replies = Counter(
            "smtpfleet_smtp_replies", "SMTP replies sent, by class", ["class"], registry=r
        )
        self.accept_latency = Histogram(
            "smtpfleet_accept_latency_seconds",
            "Final dot to reply, per message",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            "smtpfleet_queue_messages",
            "Queue entries by state (cluster-wide: use max)",
            ["state"],
            registry=r,
        )
        self.oldest = Gauge(
            "smtpfleet_queue_oldest_age_seconds",
            "Age of the oldest entry in the streams (cluster-wide: use max)",
            registry=r,
        )
        self.class_queue = Gauge(
            "smtpfleet_queue_class_messages",
            "Queue entries by traffic class and state (ready, in_flight, retry; cluster-wide: "
            "use max)",
            ["class", "state"],
            registry=r,
        )
        self.class_oldest = Gauge(
            "smtpfleet_queue_class_oldest_age_seconds",
            "Age of the oldest entry in the traffic class's streams (cluster-wide: use max)",
            ["class"],
            registry=r,
        )
        self.deliveries = Counter(
            "smtpfleet_deliveries",
            "Recipient delivery attempts by relay and outcome",
            ["relay", "outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "smtpfleet_delivery_attempt_seconds",
            "One message on one relay",
            ["relay"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "smtpfleet_delivery_latency_seconds",
            "Accepted to delivered, per recipient",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.class_latency = Histogram(
            "smtpfleet_class_delivery_latency_seconds",
            "Accepted to delivered, per recipient, by traffic class (its count: deliveries)",
            ["class"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.bounces = Counter("smtpfleet_bounces", "DSNs generated", registry=r)
        self.task_restarts = Counter(
            "smtpfleet_task_restarts",
            "Background tasks restarted after an unexpected error (a bug: see the node's log)",
            ["task"],
            registry=r,
        )
        self.dead_letters = Counter(
            "smtpfleet_dead_letters", "Recipients sent to the dead-letter stream", registry=r
        )
        self.tls = Counter(
            "smtpfleet_tls_handshakes",
            "TLS handshakes by direction, result and TLS version",
            ["direction", "result", "version"],
            registry=r,
        )
        self.relay_tls = Counter(
            "smtpfleet_relay_tls_handshakes",
            "Outbound TLS handshakes per relay (deliveries and health checks) by result, version",
            ["relay", "result", "version"],
            registry=r,
        )
        self.relay_chained = Counter(
            "smtpfleet_relay_chained_messages",
            "Messages whose envelope went to the relay in the same write as the previous "
            "message's body, on the same session (RFC 2920 pipelining across messages)",
            ["relay"],
            registry=r,
        )
        self.relay_replies_lost = Counter(
            "smtpfleet_relay_replies_lost",
            "Messages whose final dot went out to the relay and got no reply (the session "
            "broke or timed out): it may have stored them, and a retry may deliver them twice",
            ["relay"],
            registry=r,
        )
        self.relay_cert_expiry = Gauge(
            "smtpfleet_relay_certificate_expiry_days",
            "Days until the relay's certificate expires, as the health check last saw it",
            ["relay"],
            registry=r,
        )
        self.auth = Counter(
            "smtpfleet_smtp_auth", "SMTP AUTH attempts by result", ["result"], registry=r
        )
        self.dkim = Counter(
            "smtpfleet_dkim_signatures",
            "Accepted messages by signing domain (configured ones; 'none': no key for the "
            "From: domain) and result (signed, failed, no_key)",
            ["domain", "result"],
            registry=r,
        )
        self.proxy_headers = Counter(
            "smtpfleet_proxy_headers",
            "PROXY protocol connections by result",
            ["result"],
            registry=r,
        )
        self.client_limit_refusals = Counter(
            "smtpfleet_client_limit_refusals",
            "Clients refused by a per-client limit, by limit (sessions, messages, recipients, "
            "data_rate)",
            ["limit"],
            registry=r,
        )
        self.client_limit_fallbacks = Counter(
            "smtpfleet_client_limit_fallbacks",
            "Per-client limit checks decided on this node's counts alone: Redis away or slow",
            registry=r,
        )
        self.client_limits_shared = Gauge(
            "smtpfleet_client_limits_shared",
            "1 while per-client limits are counted cluster-wide in Redis, 0 while per node",
            registry=r,
        )
        self.health_checks = Counter(
            "smtpfleet_health_checks",
            "Active health checks by relay and result",
            ["relay", "result"],
            registry=r,
        )
        self.relay_up = Gauge(
            "smtpfleet_relay_up",
            "1 if the relay is up: this node's view, or the cluster verdict",
            ["relay", "view"],
            registry=r,
        )
        self.live_nodes = Gauge(
            "smtpfleet_live_nodes",
            "Nodes with a fresh heartbeat (cluster-wide: use max)",
            registry=r,
        )
        self.config_drift = Gauge(
            "smtpfleet_config_drift",
            "1 while a live peer publishes a routing configuration fingerprint unlike this node's",
            registry=r,
        )
        self.config_fingerprints = Gauge(
            "smtpfleet_config_fingerprints",
            "Distinct routing configuration fingerprints among this node and its live peers",
            registry=r,
        )
        self.takeovers = Counter(
            "smtpfleet_takeovers", "Dead nodes whose pending work this node claimed", registry=r
        )
        self.redeliveries = Counter(
            "smtpfleet_redeliveries",
            "Entries claimed from dead or stuck consumers: deliveries that may be duplicates",
            registry=r,
        )
        self.redis_batch_commands = Histogram(
            "smtpfleet_redis_batch_commands",
            "Commands per group-commit pipeline, by batcher (accept, delivery)",
            ["batcher"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.redis_confirmations = Counter(
            "smtpfleet_redis_confirmations",
            "WAITAOF/WAIT sent: one per accept batch that asked for durability",
            registry=r,
        )
        self.gc_pauses = Histogram(
            "smtpfleet_gc_pause_seconds",
            "Cyclic garbage collections, by generation: each one stalls every session",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._zero_fill()

    def child(self, metric: Counter | Histogram, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: `labels()` takes a lock and builds its key
        on every call, several times per message on the accept and delivery paths."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def task_restarted(self, task: str) -> None:
        self.task_restarts.labels(task).inc()

    def outbound_tls(self, relay: str, result: str, version: str | None) -> None:
        """One handshake with a relay (a delivery session or a health check)."""
        self.tls.labels("outbound", result, tls_version(version)).inc()
        self.relay_tls.labels(relay, result, tls_version(version)).inc()

    def chained(self, relay: str) -> None:
        self.child(self.relay_chained, relay).inc()

    def reply_lost(self, relay: str) -> None:
        self.child(self.relay_replies_lost, relay).inc()

    def observe_batch(self, batcher: str) -> Callable[[int, bool], None]:
        """The group-commit observer for one batcher (queue/batcher.py's BatchObserver)."""
        histogram = self.redis_batch_commands.labels(batcher)
        confirmations = self.redis_confirmations

        def observe(commands: int, confirmed: bool) -> None:
            histogram.observe(commands)
            if confirmed:
                confirmations.inc()

        return observe

    def gc_pause(self) -> Callable[[int, float], None]:
        """The observer for `memory.watch_collections`: one histogram child per generation."""
        children = [self.gc_pauses.labels(generation) for generation in GC_GENERATIONS]

        def observe(generation: int, seconds: float) -> None:
            children[generation].observe(seconds)

        return observe

    def _zero_fill(self) -> None:
        """Series exist from the start, so `rate()` and absent-alerts work before any event."""
        for result in ("accepted", "refused_draining", "refused_capacity"):
            self.sessions.labels(result)
        for result in ("queued", "duplicate", "rejected", "tempfail"):
            self.messages.labels(result)
        for cls in ("2xx", "4xx", "5xx"):
            self.replies.labels(cls)
        self.tls.labels("inbound", "failed", "none")
        self.tls.labels("outbound", "failed", "none")
        for result in ("ok", "bad_credentials", "locked_out", "malformed", "in_clear"):
            self.auth.labels(result)
        for result in ("ok", "local", "untrusted", "invalid"):
            self.proxy_headers.labels(result)
        for limit in ("sessions", "messages", "recipients", "data_rate"):
            self.client_limit_refusals.labels(limit)
        for generation in GC_GENERATIONS:
            self.gc_pauses.labels(generation)
