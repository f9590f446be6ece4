"""Drills against a running cluster: the target file, its safety check, and its fault commands.

    name: staging                      # what the plan and the reports call it
    smtp: ["127.0.0.1:2525", ...]      # the endpoints the load goes to (every node, or the LB)
    redis: {url: "redis://127.0.0.1:6379/0", prefix: smtpfleet}   # or sentinels/master_name
    sinks: ["http://127.0.0.1:8025"]   # recording relays the cluster delivers to (reconciled)
    metrics: ["http://127.0.0.1:9100/metrics"]   # optional: takeovers from the nodes
    relay: relay-1                     # the relay the relay-* faults act on (its config name)
    allow_hosts: []                    # non-loopback hosts the drill may touch: each by name
    faults:                            # per scenario: shell commands, run with `sh -c`
      kill-node: {inject: "kill -9 $(cat /run/node-1.pid)"}
      relay-down: {inject: "...", heal: "..."}
    preset: kubernetes                 # or: fill `faults` with kubectl (see KUBERNETES)
    kubernetes: {namespace: mail}

The network scenarios (net-redis-cut, net-relay-cut, net-redis-slow, net-partition) take
commands too (the preset runs `tc` in the pod's network namespace); `drills.net_target` says
what the drill judges them by from outside. A scenario the file has no commands for is
refused, naming the key (`missing_commands`).

`{fault_s}` and `{fault_ms}` in a command become the length of the fault window. The drill
refuses a target with an address that is neither loopback nor listed in `allow_hosts`, and
prints its plan (endpoints, load, every command) before it starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import shlex
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smtpfleet.config import build_config, parse_hostport
from smtpfleet.drills.context import DrillContext, Probe, Scenario, Step
from smtpfleet.drills.net_target import a_member_left, net_on_target, remember_members
from smtpfleet.drills.remote import RemoteCluster, RemoteSink

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0
# Measured from the nodes' own logs or exit code, which a running cluster does not hand us.
# slot_moved: the Redis Cluster drills' probe reads the cluster they built.
LOCAL_ONLY_MEASURES = frozenset({"live_declared_dead", "exit_code", "slot_moved"})


class TargetError(ValueError):
    """The target file is malformed or names something the drill must not touch."""


@dataclass(frozen=True)
class FaultCommands:
    inject: str
    heal: str | None = None


@dataclass(frozen=True)
class Target:
    name: str
    smtp: list[tuple[str, int]]
    redis: dict[str, Any]
    sinks: list[str]
    faults: dict[str, FaultCommands]
    metrics: list[str] = field(default_factory=list)
    relay: str = "relay-1"
    allow_hosts: list[str] = field(default_factory=list)

    def hosts(self) -> set[str]:
        """Every host the drill will send to or read from."""
        hosts = {h for h, _ in self.smtp}
        hosts |= {urllib.parse.urlsplit(u).hostname or "" for u in [*self.sinks, *self.metrics]}
        if self.redis.get("url") and not self.redis.get("sentinels"):
            hosts.add(urllib.parse.urlsplit(self.redis["url"]).hostname or "")
        hosts |= {parse_hostport(a)[0] for a in self.redis.get("sentinels", [])}
        return hosts

    def check_safe(self) -> None:
        """Refuse anything that is not loopback and not explicitly allowed by name."""
        foreign = sorted(h for h in self.hosts() if not _loopback(h) and h not in self.allow_hosts)
        if foreign:
            raise TargetError(
                f"target {self.name!r} names {', '.join(foreign)}: not loopback and not in "
                "allow_hosts; list each host there to drill it"
            )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_target(path: Path) -> Target:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise TargetError(f"{path}: expected a mapping")
    faults = dict(_preset(raw))
    faults.update(_faults(raw.get("faults") or {}, path))
    try:
        target = Target(
            name=str(raw.get("name", path.stem)),
            smtp=[parse_hostport(a) for a in raw["smtp"]],
            redis=dict(raw["redis"]),
            sinks=[str(u).rstrip("/") for u in raw["sinks"]],
            faults=faults,
            metrics=[str(u) for u in raw.get("metrics", [])],
            relay=str(raw.get("relay", "relay-1")),
            allow_hosts=[str(h) for h in raw.get("allow_hosts", [])],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TargetError(f"{path}: {exc!r} (needs smtp, redis, sinks)") from None
    target.check_safe()
    return target


def _faults(raw: object, path: Path) -> dict[str, FaultCommands]:
    """`faults:`, each entry checked, with errors that name the key."""
    if not isinstance(raw, dict):
        raise TargetError(f"{path}: faults: expected a mapping of scenario -> {{inject, heal}}")
    faults = {}
    for name, commands in raw.items():
        if not isinstance(commands, dict) or not isinstance(commands.get("inject"), str):
            raise TargetError(f"{path}: faults.{name}.inject: missing (a shell command)")
        unknown = sorted(set(commands) - {"inject", "heal"})
        if unknown:
            raise TargetError(f"{path}: faults.{name}.{unknown[0]}: unknown (inject, heal)")
        heal = commands.get("heal")
        if heal is not None and not isinstance(heal, str):
            raise TargetError(f"{path}: faults.{name}.heal: expected a shell command")
        faults[str(name)] = FaultCommands(commands["inject"], heal)
    return faults


def missing_commands(target: Target, name: str, path: Path) -> str | None:
    """Why `name` cannot run against this target (None: the file has its commands)."""
    if name in target.faults:
        return None
    return (
        f"target {target.name!r} has no commands for {name}: add faults.{name} "
        f"(inject, and heal) to {path}, or a preset that has it (docs/drills.md)"
    )


def _preset(raw: Mapping[str, Any]) -> Mapping[str, FaultCommands]:
    if raw.get("preset") is None:
        return {}
    if raw["preset"] != "kubernetes":
        raise TargetError(f"unknown preset {raw['preset']!r} (known: kubernetes)")
    return kubernetes_faults(raw.get("kubernetes") or {})


def kubernetes_faults(k8s: Mapping[str, Any]) -> dict[str, FaultCommands]:
    """kubectl for each fault, for the chart's `smtpfleet` Deployment (docs/drills.md)."""
    kubectl = "kubectl --namespace " + shlex.quote(str(k8s.get("namespace", "default")))
    if k8s.get("context"):
        kubectl += " --context " + shlex.quote(str(k8s["context"]))
    selector = shlex.quote(str(k8s.get("selector", "app.kubernetes.io/name=smtpfleet")))
    first_pod = f"POD=$({kubectl} get pods -l {selector} -o name | head -n 1) && "
    relay = "deployment/" + shlex.quote(str(k8s.get("relay_deployment", "smtpfleet-relay")))
    replicas = int(k8s.get("relay_replicas", 1))
    redis = shlex.quote(str(k8s.get("redis_pod", "redis-0")))
    container = shlex.quote(str(k8s.get("redis_container", "redis")))
    redis_cli = f"{kubectl} exec {redis} -c {container} -- redis-cli"
    sentinel_cli = (
        f"{kubectl} exec {redis} -c {shlex.quote(str(k8s.get('sentinel_container', 'sentinel')))}"
        f" -- redis-cli -p {int(k8s.get('sentinel_port', 26379))}"
    )
    master = shlex.quote(str(k8s.get("master_name", "smtpfleet")))
    return {
        **kubernetes_network_faults(k8s, kubectl, first_pod),
        "kill-node": FaultCommands(
            first_pod + f'{kubectl} delete "$POD" --grace-period=0 --force --wait=false'
        ),
        "drain-node": FaultCommands(first_pod + f'{kubectl} delete "$POD" --wait=false'),
        "relay-down": FaultCommands(
            f"{kubectl} scale {relay} --replicas=0",
            f"{kubectl} scale {relay} --replicas={replicas}",
        ),
        "relay-slow": FaultCommands(
            f"{kubectl} exec {relay} -- tc qdisc add dev eth0 root netem delay 1500ms",
            f"{kubectl} exec {relay} -- tc qdisc del dev eth0 root",
        ),
        "redis-unavailable": FaultCommands(
            f"{redis_cli} CLIENT PAUSE {{fault_ms}} ALL", f"{redis_cli} CLIENT UNPAUSE"
        ),
        "redis-failover": FaultCommands(f"{sentinel_cli} SENTINEL FAILOVER {master}"),
    }


# The preference of the drill's tc filters in a pod: one the drill alone uses, so the heal
# deletes its own filters and nothing else in the pod's network namespace.
DRILL_TC_PREF = 4915


def kubernetes_network_faults(
    k8s: Mapping[str, Any], kubectl: str, first_pod: str
) -> dict[str, FaultCommands]:
    """net-redis-cut, net-relay-cut and net-redis-slow as `tc` in the pod's own network
    namespace, run by an ephemeral debug container with NET_ADMIN (`kubectl debug
    --profile=netadmin`): the chart's pods drop every capability and carry no tc, and a
    NetworkPolicy cannot take away what the chart's own policy allows (policies only add)."""
    image = shlex.quote(str(k8s.get("netadmin_image", "nicolaka/netshoot")))
    dev = shlex.quote(str(k8s.get("interface", "eth0")))
    debug = f"{kubectl} debug --profile=netadmin --image={image} --attach --quiet"
    redis = shlex.quote(str(k8s.get("redis_pod", "redis-0")))
    relays = shlex.quote(str(k8s.get("relay_selector", "app.kubernetes.io/name=smtpfleet-relay")))
    redis_ip = f"PEER=$({kubectl} get pod {redis} -o jsonpath='{{.status.podIP}}') && "
    relay_ip = (
        f"PEER=$({kubectl} get pods -l {relays} -o jsonpath='{{.items[0].status.podIP}}') && "
    )
    cut, heal = _tc_cut(debug, dev), _tc_heal(debug, dev)
    slow = f"{debug} {redis} -- tc qdisc"
    return {
        "net-redis-cut": FaultCommands(first_pod + redis_ip + cut, first_pod + heal),
        "net-relay-cut": FaultCommands(first_pod + relay_ip + cut, first_pod + heal),
        "net-redis-slow": FaultCommands(
            f"{slow} add dev {dev} root netem delay 200ms", f"{slow} del dev {dev} root"
        ),
    }


def _tc_cut(debug: str, dev: str) -> str:
    """Drop what the pod ($POD) sends to and receives from $PEER, IPv4 or IPv6."""
    family = 'case "$PEER" in *:*) F="ipv6 u32 match ip6";; *) F="ip u32 match ip";; esac && '
    filters = " && ".join(
        f"tc filter add dev {dev} {hook} pref {DRILL_TC_PREF} protocol $F {way} $PEER action drop"
        for hook, way in (("egress", "dst"), ("ingress", "src"))
    )
    return (
        family + f'{debug} "$POD" -- sh -c "tc qdisc add dev {dev} clsact 2>/dev/null; {filters}"'
    )


def _tc_heal(debug: str, dev: str) -> str:
    deletes = "; ".join(
        f"tc filter del dev {dev} {hook} pref {DRILL_TC_PREF}" for hook in ("egress", "ingress")
    )
    return f'{debug} "$POD" -- sh -c "{deletes}"'


# -- turning a scenario into one that acts through the target's commands ---------------------


async def run_command(ctx: DrillContext, command: str, fault_s: float) -> None:
    text = command.replace("{fault_s}", f"{fault_s:g}").replace(
        "{fault_ms}", str(int(fault_s * 1000))
    )
    process = await asyncio.create_subprocess_shell(
        text, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        output = b"(timed out)"
    ran = ctx.notes.setdefault("commands", [])
    assert isinstance(ran, list)
    ran.append({"command": text, "exit": process.returncode, "output": output.decode()[-500:]})
    if process.returncode != 0:
        log.warning("fault command exited %s: %s\n%s", process.returncode, text, output.decode())


def _command_step(command: str, fault_s: float) -> Step:
    async def step(ctx: DrillContext) -> None:
        await remember_members(ctx)
        # Started, not awaited: a command may block for the whole fault (CLIENT PAUSE, sleep).
        task = asyncio.create_task(run_command(ctx, command, fault_s))
        tasks = ctx.notes.setdefault("command_tasks", [])
        assert isinstance(tasks, list)
        tasks.append(task)

    return step


def _relay_down_everywhere(relay: str) -> Probe:
    async def probe(ctx: DrillContext) -> bool:
        members = await ctx.redis.zrange(ctx.keys.nodes(), 0, -1)
        nodes = [n.decode() if isinstance(n, bytes) else str(n) for n in members]
        states = [await ctx.redis.hget(ctx.keys.view(n), relay) for n in nodes]
        return bool(states) and all(s is not None and s[:1] == b"0" for s in states)

    return probe


def _probe_for(scenario: Scenario, target: Target) -> Probe | None:
    if scenario.name in ("kill-node", "drain-node"):
        return a_member_left
    if scenario.name in ("relay-down", "relay-blackhole"):
        return _relay_down_everywhere(target.relay)
    return scenario.detected if scenario.name == "redis-failover" else None


def on_target(scenario: Scenario, target: Target, fault_s: float) -> Scenario:
    """The scenario with the target's commands as its inject and heal, probes that read only
    Redis, and without the objectives only a local cluster can measure."""
    commands = target.faults.get(scenario.name)
    if commands is None:
        raise TargetError(f"target {target.name!r} has no commands for {scenario.name!r}")
    inject = _command_step(commands.inject, fault_s)
    heal = _command_step(commands.heal, fault_s) if commands.heal else None
    net = net_on_target(scenario.name, target.relay, has_metrics=bool(target.metrics))
    if net is not None:
        inject = _then(net.before_inject, inject)
        heal = _then(net.before_heal, heal) if heal is not None else net.before_heal
    return dataclasses.replace(
        scenario,
        inject=inject,
        heal=heal,
        detected=net.detected if net is not None else _probe_for(scenario, target),
        objectives={k: v for k, v in scenario.objectives.items() if k not in LOCAL_ONLY_MEASURES},
        floors=(
            net.floors
            if net is not None and net.floors is not None
            else {k: v for k, v in scenario.floors.items() if k not in LOCAL_ONLY_MEASURES}
        ),
        sentinel=False,
        redis_cluster=False,
        overrides={},  # the cluster runs with its own configuration
    )


def _then(first: Step | None, second: Step) -> Step:
    if first is None:
        return second

    async def step(ctx: DrillContext) -> None:
        await first(ctx)
        await second(ctx)

    return step


def remote_cluster(target: Target) -> RemoteCluster:
    config = build_config({"redis": target.redis})
    sinks = [RemoteSink(url, f"sink-{i + 1}") for i, url in enumerate(target.sinks)]
    return RemoteCluster(target.smtp, config, sinks, target.metrics)


def plan(target: Target, names: Sequence[str], load: str) -> str:
    """What the drill is about to do, in full, before it does it."""
    lines = [
        f"drill plan for target {target.name!r}:",
        f"  load    {load} to {', '.join(f'{h}:{p}' for h, p in target.smtp)}",
        f"  redis   {target.redis.get('sentinels') or target.redis.get('url')}",
        f"  reconcile at {', '.join(target.sinks)}",
    ]
    for name in names:
        commands = target.faults.get(name)
        if commands is None:
            lines.append(f"  {name}: no commands in the target file (skipped)")
            continue
        lines.append(f"  {name}: inject  {commands.inject}")
        if commands.heal:
            lines.append(f"  {' ' * len(name)}  heal    {commands.heal}")
    return "\n".join(lines)
