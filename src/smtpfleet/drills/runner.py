"""Run one drill: a local cluster, steady load, the fault, the measurements, the verdict.

Timeline: warm-up (baseline throughput) → inject → fault window → heal → recovery → stop
load → settle (wait for every accepted message) → reconcile. What is measured, and the
verdict, are verdict.py's; the phases' lengths and the load are timing.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
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
from smtpfleet.drills.context import DrillContext, Scenario
from smtpfleet.drills.target import (
    Aftermath,
    Target,
    check_reachable,
    heal_after_interrupt,
    on_target,
    remote_cluster,
)
from smtpfleet.drills.timing import SAMPLE_S, Timing
from smtpfleet.drills.verdict import DrillResult, Sample, outcomes, result_of
from smtpfleet.loadgen.generator import run_load
from smtpfleet.loadgen.paced import PacedLoad
from smtpfleet.queue.connection import RedisClient
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing.localcluster import LocalCluster, deep_merge
from smtpfleet.testing.redis_cluster import RedisClusterServers
from smtpfleet.testing.sentinel import SentinelSet

# With Sentinels configured the nodes take only the database number from `redis.url`.
SENTINEL_DB_URL = "redis://127.0.0.1:1/0"
CLUSTER_SHARDS = 64

PEAK_S = 4.0  # how long the peak measurement pushes unpaced load
DETECT_GRACE_S = 0.5  # past the objective, so a late detection is measured (and fails)


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
    return result_of(scenario, timing, load, start, timeline, marks, counts, ctx)


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


async def _settle(ctx: DrillContext, load: PacedLoad, settle_s: float) -> None:
    accepted = {s.tag for s in load.sent if s.code == 250}
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        await ctx.refresh()
        delivered, bounced = outcomes(ctx.sinks)
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
