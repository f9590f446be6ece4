"""This node's health monitor: probes every relay, hears about real deliveries, publishes its
view, and derives the healthy set the worker routes over."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from smtpfleet.cluster.store import HealthViews
from smtpfleet.config import HealthConfig, RelayConfig
from smtpfleet.delivery.classify import Verdict, is_relay_trouble
from smtpfleet.errors import QueueUnavailable
from smtpfleet.health.probe import probe
from smtpfleet.health.state import (
    PassiveEjector,
    RiseFall,
    cluster_verdict,
    healthy_set,
    tier_map,
    view_ttl_ms,
)
from smtpfleet.metrics import Metrics

log = logging.getLogger(__name__)

PASSIVE_REASON = "ejected by passive checks (failed deliveries)"

Probe = Callable[[RelayConfig], Awaitable[tuple[bool, str]]]


class HealthMonitor:
    """This node's view of the relays and the healthy set the worker routes over.

    Active probes (rise/fall) and passive checks (`record`, after every real attempt) make the
    node's own view; it is published, and the cluster verdict is a quorum of the live nodes'
    views. `healthy` is the verdict, minus what this node sees down, minus paused relays.
    `probe` is injectable (tests script it); by default it speaks SMTP to each relay.
    """

    def __init__(
        self,
        *,
        relays: Sequence[RelayConfig],
        config: HealthConfig,
        store: HealthViews,
        node_id: str,
        helo: str,
        live_nodes: Callable[[], set[str]],
        metrics: Metrics,
        probe: Probe | None = None,
    ) -> None:
        self._metrics = metrics
        self._probe = probe or self._smtp_probe
        self._relays = list(relays)
        self._config = config
        self._store = store
        self._node_id = node_id
        self._helo = helo
        self._live_nodes = live_nodes
        self._active = {r.name: RiseFall(config.fall, config.rise) for r in relays}
        self._passive = PassiveEjector(config, tier_map(relays))
        self.verdict: dict[str, bool] = {r.name: True for r in relays}
        self.healthy: set[str] = {r.name for r in relays}
        self.probe_results: dict[str, tuple[bool, str]] = {}
        self._last_failure: dict[str, str] = {}  # each relay's last failed check: why it is down
        self.paused: set[str] = set()  # by an operator, cluster-wide (`smtpfleet relay pause`)

    def own_view(self) -> dict[str, bool]:
        now = time.monotonic()
        return {
            name: state.up and not self._passive.ejected(name, now)
            for name, state in self._active.items()
        }

    def record(self, relay: str, verdicts: Mapping[str, Verdict]) -> None:
        """Passive check: called by the worker after every real delivery attempt."""
        now = time.monotonic()
        if any(is_relay_trouble(v) for v in verdicts.values()):
            if self._passive.failure(relay, now):
                log.warning("relay %s ejected by passive checks", relay)
                self._recompute()
        else:
            self._passive.success(relay, now)

    async def run(self) -> None:
        """Check every interval (the node ran the first check itself, at start)."""
        while True:
            await asyncio.sleep(self._config.interval_s)
            await self.check_once()

    async def check_once(self) -> None:
        results = await asyncio.gather(*(self._probe(r) for r in self._relays))
        for relay, (ok, reason) in zip(self._relays, results, strict=True):
            self.probe_results[relay.name] = (ok, reason)
            if not ok:
                self._last_failure[relay.name] = reason
            self._metrics.health_checks.labels(relay.name, "ok" if ok else "fail").inc()
            if self._active[relay.name].observe(ok):
                state = "up" if ok else f"down ({reason})"
                log.warning("relay %s is %s as seen from %s", relay.name, state, self._node_id)
        await self._share()

    async def _smtp_probe(self, relay: RelayConfig) -> tuple[bool, str]:
        result = await probe(relay, timeout_s=self._config.timeout_s, helo=self._helo)
        if result.tls_version is not None or result.tls_failed:
            result_label = "failed" if result.tls_failed else "ok"
            self._metrics.outbound_tls(relay.name, result_label, result.tls_version)
        if result.cert_days_left is not None:
            self._metrics.relay_cert_expiry.labels(relay.name).set(round(result.cert_days_left, 3))
        return result.ok, result.reason

    def down_reasons(self) -> dict[str, str]:
        """Why each relay this node sees down is down (published with the view, for status)."""
        return {
            name: self._last_failure.get(name, "") if not self._active[name].up else PASSIVE_REASON
            for name, up in self.own_view().items()
            if not up
        }

    async def _share(self) -> None:
        """Publish our view and read everyone's; keep the last verdict while Redis is away."""
        view = self.own_view()
        try:
            ttl_ms = view_ttl_ms(self._config.interval_s)
            await self._store.publish_view(self._node_id, view, ttl_ms, self.down_reasons())
            live = self._live_nodes() | {self._node_id}
            views = await self._store.views(live)
            paused = await self._store.paused_relays()
        except QueueUnavailable:
            self._recompute()
            return
        verdict = cluster_verdict(self.verdict, views, live)
        for relay, up in verdict.items():
            if up != self.verdict.get(relay):
                log.warning("cluster verdict: relay %s is %s", relay, "up" if up else "down")
        self.verdict = verdict
        if paused != self.paused:
            log.warning("paused relays: %s", ", ".join(sorted(paused)) or "none")
            self.paused = paused
        self._recompute()

    def _recompute(self) -> None:
        view = self.own_view()
        self.healthy = healthy_set(self.verdict, view) - self.paused
        for relay, up in view.items():
            self._metrics.relay_up.labels(relay, "node").set(1 if up else 0)
        for relay, up in self.verdict.items():
            self._metrics.relay_up.labels(relay, "cluster").set(1 if up else 0)
