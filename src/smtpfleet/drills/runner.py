"""Run one drill: a local cluster, steady load, the fault, the measurements, the verdict.

Timeline: warm-up (baseline throughput) → inject → fault window → heal → recovery → stop
load → settle (wait for every accepted message) → reconcile.

- detection_s: inject until the scenario's probe sees the cluster noticed.
- rto_s: inject until delivered throughput is back to 90 % of the baseline for good.
- lost (RPO): accepted with 250, neither delivered nor bounced.
- duplicates: deliveries beyond the first.
- client_errors / client_5xx: final replies a sender saw after trying every node.
- fault_p99_ms: accept latency p99 during the fault window.
- fault_delivery_max_s: the slowest message sent during the fault window, from its send to its
  first delivery (a retry instead of the next relay at once shows here).
- relay_refusals: recipients and messages the relays refused (4xx/5xx at RCPT or the dot).
- drill_loop_lag_ms: the longest the drill's own event loop was late (its sampler's oversleep).
  The load generator runs in that loop: a large lag means the latencies are partly the drill's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from smtpfleet import http
from smtpfleet.config import Config, load_config
from smtpfleet.drills import measures
from smtpfleet.drills.context import DrillContext, Relay, Scenario
from smtpfleet.drills.target import (
    Aftermath,
    Target,
    check_reachable,
    heal_after_interrupt,
    on_target,
    remote_cluster,
)
from smtpfleet.loadgen.generator import run_load
from smtpfleet.loadgen.messages import tag_of
from smtpfleet.loadgen.paced import PacedLoad, Sent
from smtpfleet.queue.connection import RedisClient
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing.localcluster import LocalCluster, deep_merge
from smtpfleet.testing.redis_cluster import RedisClusterServers
from smtpfleet.testing.sentinel import SentinelSet

# With Sentinels configured the nodes take only the database number from `redis.url`.
SENTINEL_DB_URL = "redis://127.0.0.1:1/0"
CLUSTER_SHARDS = 64

SAMPLE_S = 0.25
PEAK_S = 4.0  # how long the peak measurement pushes unpaced load
DETECT_GRACE_S = 0.5  # past the objective, so a late detection is measured (and fails)


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


DRILL_CONFIG: dict[str, Any] = {
    "retry": {"initial_s": 0.5, "max_s": 2.0, "jitter": 0.1, "scheduler_interval_s": 0.2},
    "health": {"interval_s": 0.5, "timeout_s": 1.0, "fall": 2, "rise": 2},
    "cluster": {"heartbeat_interval_s": 0.5, "lease_s": 2.0, "lease_refresh_s": 0.5},
    "delivery": {"connect_timeout_s": 2.0, "command_timeout_s": 3.0, "claim_idle_s": 15.0},
    "queue": {"durability": "fsync"},
    "inbound": {"accept_timeout_s": 3.0},
    "redis": {"socket_timeout_s": 1.0},
    "routing": {"key": "message_id"},
}


@dataclass
class Sample:
    t: float
    delivered: int
    accepted: int


LOST_SHOWN = 50


@dataclass
class DrillResult:
    scenario: str
    proves: str
    metrics: dict[str, float | int | None]
    objectives: dict[str, float]
    failures: list[str]
    timeline: list[Sample]
    latencies: list[tuple[float, float]]  # (t, accept latency s) relative to start
    marks: dict[str, float]  # inject, heal, detected, recovered (s since start)
    counts: dict[str, int] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)  # durability, rate, nodes
    # Objectives missed because of a known, reported bug: shown in every report, not failed.
    waived: list[str] = field(default_factory=list)
    # The Message-IDs of acknowledged messages never delivered (the first LOST_SHOWN): what an
    # operator looks up in the node logs and the queue.
    lost: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


async def run_target_drill(
    scenario: Scenario, timing: Timing, target: Target, aftermath: Aftermath | None = None
) -> DrillResult:
    """The scenario against a running cluster, through the target file's commands.

    Cancelled (Ctrl-C) or failed after its fault was injected, it runs the fault's heal
    command before it gives up (the operator's cluster is not left broken), and notes in
    `aftermath` what it did, for the caller to report."""
    remote = remote_cluster(target)
    client = _redis_client(remote.config)
    ctx = DrillContext(client, remote=remote)
    try:
        await check_reachable(target, remote, client)
        await remote.mark_start()
        return await _drive(on_target(scenario, target, timing.fault_s), timing, ctx)
    except BaseException:
        await heal_after_interrupt(
            ctx, target, scenario.name, timing.fault_s, aftermath or Aftermath()
        )
        raise
    finally:
        await client.aclose()


async def run_drill(
    scenario: Scenario,
    timing: Timing,
    overrides: Mapping[str, Any] | None = None,
    *,
    ipv6: bool = False,
) -> DrillResult:
    """One drill on a fresh local cluster; `overrides` go on top of the drill's configuration
    (e.g. `{"queue": {"durability": "server"}}` to measure another durability mode). `ipv6`
    runs a network drill's fabric on IPv6 addresses (the others ignore it)."""
    config = deep_merge(deep_merge(DRILL_CONFIG, scenario.overrides), overrides or {})
    async with _deployment(scenario, config, timing, ipv6=ipv6) as ctx:
        return await _drive(scenario, timing, ctx)


@contextlib.asynccontextmanager
async def _deployment(
    scenario: Scenario, config: dict[str, Any], timing: Timing, *, ipv6: bool = False
) -> AsyncIterator[DrillContext]:
    """Redis (one server, a Sentinel set or a Redis Cluster), two sink relays and three nodes
    on loopback."""
    async with contextlib.AsyncExitStack() as stack:
        redis = await _redis_for(scenario, stack)
        config = deep_merge(config, redis.overrides)
        cluster = _cluster_for(scenario, ipv6=ipv6)(
            nodes=timing.nodes,
            sinks=2,
            overrides=config,
            appendfsync="always",
            redis_url=redis.url,
        )
        await stack.enter_async_context(cluster)
        client = _redis_client(load_config(cluster.node_processes[0].config_path, {}))
        stack.push_async_callback(client.aclose)
        yield DrillContext(
            client, local=cluster, sentinels=redis.sentinels, redis_cluster=redis.cluster
        )


@dataclass
class _Redis:
    """The Redis a drill brought (None: the local cluster starts one server itself)."""

    url: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    sentinels: SentinelSet | None = None
    cluster: RedisClusterServers | None = None


async def _redis_for(scenario: Scenario, stack: contextlib.AsyncExitStack) -> _Redis:
    if scenario.sentinel:
        sentinels = SentinelSet(replicas=2, sentinels=3, appendfsync="always")
        stack.callback(sentinels.close)
        await _start_in_thread(sentinels.start)
        overrides = {"redis": {"sentinels": sentinels.sentinel_addresses}}
        return _Redis(SENTINEL_DB_URL, overrides, sentinels=sentinels)
    if scenario.redis_cluster:
        servers = RedisClusterServers(primaries=3, replicas=1, appendfsync="always")
        stack.callback(servers.close)
        await _start_in_thread(servers.start)
        # Every node is a seed, so a node (re)starting while one is down still finds the rest;
        # 64 shards spread the mail over all three primaries (docs/cluster.md).
        seeds = {"cluster": True, "cluster_nodes": servers.addresses[1:], "shards": CLUSTER_SHARDS}
        return _Redis(servers.url, {"redis": seeds}, cluster=servers)
    return _Redis()


async def _start_in_thread(start: Callable[[], None]) -> None:
    """A blocking start in a thread. Cancelled (Ctrl-C), it still waits for the thread to end
    before passing the cancellation on: the close that follows must not run while the thread
    is still spawning servers, which would then outlive the drill."""
    started = asyncio.ensure_future(asyncio.to_thread(start))
    try:
        await asyncio.shield(started)
    except asyncio.CancelledError:
        await asyncio.wait({started})
        raise


def _cluster_for(scenario: Scenario, *, ipv6: bool) -> Callable[..., LocalCluster]:
    if not scenario.netns:
        return LocalCluster
    from smtpfleet.testing.netns import NetnsError, unavailable_reason
    from smtpfleet.testing.netns_cluster import NetnsCluster

    reason = unavailable_reason()
    if reason is not None:
        raise NetnsError(f"{scenario.name} needs network namespaces: {reason}")
    return functools.partial(NetnsCluster, ipv6=ipv6)


def _redis_client(config: Config) -> RedisClient:
    """The drill's own client for its probes: through the Sentinels when there are some, the
    cluster client on a Redis Cluster."""
    if config.redis.cluster:
        return RedisCluster.from_url(config.redis.url, socket_timeout=1.0)
    if not config.redis.sentinels:
        return aioredis.Redis.from_url(config.redis.url, socket_timeout=1.0)
    from redis.asyncio.sentinel import Sentinel

    hosts = [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in config.redis.sentinels]
    sentinel = Sentinel(hosts, socket_timeout=1.0)  # type: ignore[no-untyped-call]
    return sentinel.master_for(config.redis.master_name, socket_timeout=1.0)  # type: ignore[no-any-return]


async def _drive(scenario: Scenario, timing: Timing, ctx: DrillContext) -> DrillResult:
    if scenario.rate is not None:
        timing = dataclasses.replace(timing, rate=scenario.rate, rate_fraction=None)
    if timing.rate_fraction is not None:
        peak = await measure_peak(ctx, timing)
        ctx.notes["peak_rate"] = peak
        timing = dataclasses.replace(timing, rate=round(max(1.0, peak * timing.rate_fraction)))
    # A run id of its own: relays of a running cluster keep what earlier drills sent.
    run_id = f"{scenario.name}-{uuid.uuid4().hex[:8]}"
    load = PacedLoad(ctx.smtp_targets, rate=timing.rate, size=timing.size, run_id=run_id)
    ctx.notes["sent"] = load.sent  # for scenarios that judge by send times (drills/classes.py)
    start = time.monotonic()
    timeline: list[Sample] = []
    await ctx.refresh()
    # The relays' count so far (the peak measurement's mail, earlier drills' on a target's
    # relays) is not this drill's: the timeline counts only what arrives from now on.
    earlier = sum(s.count for s in ctx.sinks)
    marks: dict[str, float] = {}
    ctx.notes["fault_s"] = float(timing.fault_s)
    running = asyncio.create_task(load.run())
    helpers = [running, asyncio.create_task(_sample(ctx, load, start, timeline, earlier))]
    try:
        await _phases(scenario, timing, ctx, (load, running), start, marks, helpers)
    finally:
        # Cancelled (Ctrl-C) or failed mid-drill: the load, the sampler, the probe and the
        # fault commands stop here, before the cluster under them is shut down.
        await _stop_helpers([*helpers, *_command_tasks(ctx)])
    await ctx.refresh()
    counts = {
        "retries": await _retry_depth(ctx),
        "takeovers": await _takeovers(ctx),
        "live_declared_dead": _live_declared_dead(ctx.local, _cut_off(ctx)),
    }
    return _result(scenario, timing, load, start, timeline, marks, counts, ctx)


async def _phases(
    scenario: Scenario,
    timing: Timing,
    ctx: DrillContext,
    loading: tuple[PacedLoad, asyncio.Task[None]],
    start: float,
    marks: dict[str, float],
    helpers: list[asyncio.Task[None]],
) -> None:
    """Warm-up, fault, heal, recovery and settling. The probe's task joins `helpers`, which
    the caller stops whatever happens."""
    load, running = loading
    await asyncio.sleep(timing.warmup_s)
    marks["inject"] = time.monotonic() - start
    await scenario.inject(ctx)
    detector = asyncio.create_task(_detect(scenario, ctx, start, marks))
    helpers.append(detector)
    await asyncio.sleep(timing.fault_s)
    await _until_detected(scenario, detector, start + marks["inject"])
    if scenario.heal is not None:
        await scenario.heal(ctx)
        marks["heal"] = time.monotonic() - start
    await asyncio.sleep(timing.recovery_s)
    await _until_accepting_again(scenario, load, start, marks["inject"])
    load.stop()
    await running  # the load's last sends
    marks["load_stopped"] = time.monotonic() - start
    await _settle(ctx, load, timing.settle_s)
    await _finish_commands(ctx)
    await asyncio.sleep(0.5)


def _command_tasks(ctx: DrillContext) -> list[asyncio.Task[Any]]:
    tasks = ctx.notes.get("command_tasks", [])
    assert isinstance(tasks, list)
    return tasks


async def _stop_helpers(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _until_detected(scenario: Scenario, detector: asyncio.Task[None], inject: float) -> None:
    """Hold the fault past its window while the probe has not fired, up to the scenario's
    detection objective: healing first would take away what is to be detected, and a cluster
    that notices after the window but within its objective would read "not measured"."""
    bound = scenario.objectives.get("detection_s")
    if scenario.detected is None or not isinstance(bound, int | float):
        return
    left = inject + float(bound) + DETECT_GRACE_S - time.monotonic()
    if left > 0:
        await asyncio.wait({detector}, timeout=left)


async def _until_accepting_again(
    scenario: Scenario, load: PacedLoad, start: float, inject_s: float
) -> None:
    """Keep the load running past the recovery window while senders are still refused, up to
    the scenario's accept RTO objective: a fleet that comes back after the window but within
    its objective is measured (and passes), not reported as "never came back"."""
    bound = scenario.objectives.get("accept_rto_s")
    if not isinstance(bound, int | float):
        return
    deadline = start + inject_s + float(bound) + 1.0
    while time.monotonic() < deadline:
        if measures.accept_rto_s(load.sent, start, inject_s) is not None:
            return  # a 250 came after the last refusal
        await asyncio.sleep(0.5)


async def measure_peak(ctx: DrillContext, timing: Timing) -> float:
    """Accepted messages per second under unpaced load (50 senders, a session per message),
    then wait until the relays have it all, so the drill starts from an empty queue."""
    await ctx.refresh()
    before = sum(s.count for s in ctx.sinks)
    result = await run_load(
        ctx.smtp_targets, duration_s=PEAK_S, concurrency=50, size=timing.size, per_session=1
    )
    deadline = time.monotonic() + timing.settle_s
    while time.monotonic() < deadline:
        await ctx.refresh()
        if sum(s.count for s in ctx.sinks) >= before + result.accepted:
            break
        await asyncio.sleep(0.2)
    return round(result.accepted / result.elapsed_s, 1) if result.elapsed_s else 0.0


async def _finish_commands(ctx: DrillContext) -> None:
    tasks = ctx.notes.pop("command_tasks", [])
    assert isinstance(tasks, list)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sample(
    ctx: DrillContext, load: PacedLoad, start: float, out: list[Sample], earlier: int
) -> None:
    while True:
        await ctx.refresh()
        delivered = sum(s.count for s in ctx.sinks) - earlier
        accepted = sum(1 for s in load.sent if s.code == 250)
        out.append(Sample(time.monotonic() - start, delivered, accepted))
        await asyncio.sleep(SAMPLE_S)


async def _detect(
    scenario: Scenario, ctx: DrillContext, start: float, marks: dict[str, float]
) -> None:
    if scenario.detected is None:
        return
    while True:
        try:
            if await scenario.detected(ctx):
                marks["detected"] = time.monotonic() - start
                return
        except (aioredis.RedisError, OSError):
            pass
        await asyncio.sleep(0.05)


def _outcomes(sinks: Sequence[Relay]) -> tuple[dict[str, int], set[str]]:
    """Deliveries per tag, and the tags that came back as a DSN."""
    delivered: dict[str, int] = {}
    bounced: set[str] = set()
    for sink in sinks:
        for message in sink.messages:
            if message.sender == "":
                marker = b"@loadgen.smtpfleet>"
                for part in message.data.split(b"Message-ID: <")[1:]:
                    if marker in part.split(b"\r\n", 1)[0]:
                        bounced.add(part.split(b"@", 1)[0].decode())
                continue
            tag = tag_of(message.data)
            if tag is not None:
                delivered[tag] = delivered.get(tag, 0) + 1
    return delivered, bounced


def _first_arrivals(sinks: Sequence[Relay]) -> dict[str, float]:
    """When each tag first reached a relay (time.monotonic(), the drill's own clock)."""
    first: dict[str, float] = {}
    for sink in sinks:
        for message in sink.messages:
            tag = tag_of(message.data)
            if tag is not None and message.sender != "":
                first[tag] = min(first.get(tag, message.at), message.at)
    return first


def _refusals(sinks: Sequence[Relay]) -> int:
    return sum(len(s.refused_recipients) + len(s.rejected) for s in sinks)


def fault_delivery_max_s(
    sent: list[Sent], arrivals: dict[str, float], start: float, inject_s: float, end_s: float
) -> float | None:
    """Send to first delivery, at worst, of the messages sent in the fault window; None when
    one of them never arrived (`lost` says so) or none was sent."""
    waits = [
        arrivals[s.tag] - s.at
        for s in sent
        if s.code == 250 and inject_s <= s.at - start <= end_s and s.tag in arrivals
    ]
    return round(max(waits), 2) if waits else None


async def _settle(ctx: DrillContext, load: PacedLoad, settle_s: float) -> None:
    accepted = {s.tag for s in load.sent if s.code == 250}
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        await ctx.refresh()
        delivered, bounced = _outcomes(ctx.sinks)
        if accepted <= set(delivered) | bounced:
            return
        await asyncio.sleep(0.1)


async def _retry_depth(ctx: DrillContext) -> int:
    config = ctx.config
    queue = RedisQueue(config.redis, config.queue)
    try:
        return int((await queue.stats(int(time.time() * 1000)))["retry"])
    finally:
        await queue.close()


async def _takeovers(ctx: DrillContext) -> int | None:
    """Takeovers the running nodes performed (their /metrics): a node that was never dead
    must not be taken over, so outside kill-node this should be 0."""
    if ctx.remote is not None:
        return await ctx.remote.takeovers()
    total = 0
    for node in ctx.cluster.node_processes:
        if node.running:
            status, body = await http.get("/metrics", port=node.http_port, host=node.host)
            total += measures.takeovers_in(body) if status == 200 else 0
    return total


def _cut_off(ctx: DrillContext) -> set[str]:
    """Nodes a network drill cut off from Redis: judging them dead is right, not a fault."""
    cut_off = ctx.notes.get("cut_off", set())
    assert isinstance(cut_off, set)
    return cut_off


def _live_declared_dead(cluster: LocalCluster | None, excused: set[str]) -> int | None:
    """Times a node judged dead (took over, or removed) a node that was running all along
    and never cut off (from the nodes' logs: None for a cluster the drill did not start)."""
    if cluster is None:
        return None
    alive = {f"node-{n.index}" for n in cluster.node_processes if n.running} - excused
    total = 0
    for node in cluster.node_processes:
        with contextlib.suppress(OSError):
            lines = node.log_path.read_text(errors="replace").splitlines()
            total += measures.declared_dead(lines, alive)
    return total


def _rto(timeline: list[Sample], marks: dict[str, float], timing: Timing) -> float:
    """Inject until the delivered rate (1 s windows) is back to 90 % of the baseline for good."""
    window = int(1.0 / SAMPLE_S)
    rates = [
        (timeline[i].t, (timeline[i].delivered - timeline[i - window].delivered) / 1.0)
        for i in range(window, len(timeline))
        if timeline[i].t <= marks["load_stopped"]
    ]
    before = [r for t, r in rates if marks["inject"] - 2.0 <= t <= marks["inject"]]
    baseline = statistics.median(before) if before else timing.rate
    low = [t for t, r in rates if t > marks["inject"] and r < 0.9 * baseline]
    return round(max(low) - marks["inject"], 2) if low else 0.0


def _result(
    scenario: Scenario,
    timing: Timing,
    load: PacedLoad,
    start: float,
    timeline: list[Sample],
    marks: dict[str, float],
    counts: dict[str, int | None],
    ctx: DrillContext,
) -> DrillResult:
    accepted = {s.tag for s in load.sent if s.code == 250}
    delivered, bounced = _outcomes(ctx.sinks)
    lost = accepted - set(delivered) - bounced
    inject, fault_end = marks["inject"], marks.get("heal", marks["inject"] + timing.fault_s)
    in_fault = fault_latencies(load.sent, start, inject, fault_end)
    if scenario.detected_by_clients:
        refused = [s.at - start for s in load.sent if s.code != 250 and s.at - start >= inject]
        if refused:
            marks["detected"] = min(refused)
    rto = _rto(timeline, marks, timing)
    if rto:
        marks["recovered"] = marks["inject"] + rto
    metrics: dict[str, float | int | None] = {
        "sent": len(load.sent),
        "accepted": len(accepted),
        "delivered": sum(1 for t in accepted if t in delivered),
        "bounced": len(bounced & accepted),
        "lost": len(lost),
        "duplicates": measures.duplicates(delivered, (s.tag for s in load.sent)),
        "client_errors": sum(1 for s in load.sent if s.code != 250),
        "client_5xx": sum(1 for s in load.sent if 500 <= s.code < 600),
        "client_4xx": sum(1 for s in load.sent if 400 <= s.code < 500),
        "detection_s": round(marks["detected"] - inject, 2) if "detected" in marks else None,
        "rto_s": rto,
        "fault_p99_ms": round(_p99(in_fault) * 1000, 1),
        "drill_loop_lag_ms": round(loop_lag_s(timeline) * 1000, 1),
        "max_latency_s": round(max((s.latency_s for s in load.sent), default=0.0), 2),
        "retries": counts["retries"],
        "takeovers": counts["takeovers"],
        "live_declared_dead": counts["live_declared_dead"],
        "fault_delivery_max_s": fault_delivery_max_s(
            load.sent, _first_arrivals(ctx.sinks), start, inject, fault_end
        ),
        "relay_refusals": _refusals(ctx.sinks),
        "exit_code": ctx.notes.get("exit_code")
        if isinstance(ctx.notes.get("exit_code"), int)
        else None,  # type: ignore[dict-item]
    }
    metrics.update(_availability(load.sent, start, timeline, marks, metrics))
    metrics.update(_scenario_measures(ctx))
    durability = ctx.config.queue.durability
    objectives = scenario.objectives_for(durability)
    missed = _judge(scenario, objectives, metrics)
    failures = [f for f in missed if f.split(" ", 1)[0] not in scenario.known_issues]
    waived = [
        f"{f} (known issue: {scenario.known_issues[f.split(' ', 1)[0]]})"
        for f in missed
        if f not in failures
    ]
    latencies = [(s.at - start, s.latency_s) for s in load.sent if s.code == 250]
    return DrillResult(
        scenario.name,
        scenario.proves,
        metrics,
        objectives,
        failures,
        timeline,
        latencies,
        marks,
        floors=dict(scenario.floors),
        lost=sorted(lost)[:LOST_SHOWN],
        settings={
            "durability": str(durability),
            "rate": timing.rate,
            "size": timing.size,
            "nodes": len(ctx.smtp_targets),
            **({"peak_rate": ctx.notes["peak_rate"]} if "peak_rate" in ctx.notes else {}),
            **({"commands": ctx.notes["commands"]} if "commands" in ctx.notes else {}),
            **(
                {"network_faults_by": ctx.notes["impaired_by"]}
                if "impaired_by" in ctx.notes
                else {}
            ),
            **_fabric_setting(ctx),
        },
        waived=waived,
    )


def _fabric_setting(ctx: DrillContext) -> dict[str, object]:
    """The network a drill in namespaces ran on (its report says IPv4 or IPv6)."""
    info = ctx.local.info() if ctx.local is not None else {}
    return {"fabric": info["fabric"]} if "fabric" in info else {}


def _availability(
    sent: list[Sent],
    start: float,
    timeline: list[Sample],
    marks: dict[str, float],
    metrics: dict[str, float | int | None],
) -> dict[str, float | int | None]:
    """When senders were refused, when the fleet took mail again, and how many duplicates
    exceed what was in flight while the fault lasted."""
    inject = marks["inject"]
    fault_end = max(marks.get("heal", inject), marks.get("detected", inject)) + 1.0
    in_flight = measures.in_flight_max(timeline, inject, fault_end)
    duplicates = metrics["duplicates"]
    assert isinstance(duplicates, int)
    return {
        "refusal_window_s": measures.refusal_window_s(sent, start, inject),
        "accept_rto_s": measures.accept_rto_s(sent, start, inject),
        "in_flight_max": in_flight,
        "excess_duplicates": max(0, duplicates - in_flight),
    }


def _scenario_measures(ctx: DrillContext) -> dict[str, float | int | None]:
    """What a scenario's own steps measured (e.g. the reply of a node cut off from Redis)."""
    measures = ctx.notes.get("measures", {})
    assert isinstance(measures, dict)
    return {str(k): v for k, v in measures.items() if isinstance(v, int | float)}


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def fault_latencies(sent: list[Sent], start: float, inject_s: float, end_s: float) -> list[float]:
    """Accept latencies of the messages whose first attempt began inside the fault window."""
    return [s.latency_s for s in sent if s.code == 250 and inject_s <= s.at - start <= end_s]


def loop_lag_s(timeline: list[Sample]) -> float:
    """How late the sampler woke at worst: the drill loop's own stall, not the cluster's."""
    gaps = [b.t - a.t for a, b in itertools.pairwise(timeline)]
    return max(0.0, max(gaps, default=SAMPLE_S) - SAMPLE_S)


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _judge(
    scenario: Scenario, objectives: Mapping[str, float], metrics: dict[str, float | int | None]
) -> list[str]:
    failures = []
    for name, bound in objectives.items():
        value = metrics.get(name)
        if value is None:
            failures.append(f"{name}: not measured (objective ≤ {bound})")
        elif value > bound:
            failures.append(f"{name} = {value} > {bound}")
    for name, floor in scenario.floors.items():
        value = metrics.get(name)
        if value is None or value < floor:
            failures.append(f"{name} = {value} < {floor}: the fault was not exercised")
    if scenario.expects_bounces and not metrics["bounced"]:
        failures.append("bounced = 0: the permanent failures produced no DSN")
    return failures
