"""Drills against a running cluster: a target file's fault commands as a scenario's steps.

The file itself (its keys, their checks, and the safety rule: every host loopback or listed in
`allow_hosts`) is `target_file`; the Kubernetes preset's commands are `kubernetes`. The
network scenarios (net-redis-cut, net-relay-cut, net-redis-slow, net-partition) take commands
too; `drills.net_target` says what the drill judges them by from outside. A scenario the file
has no commands for is refused, naming the key (`missing_commands`).

`{fault_s}` and `{fault_ms}` in a command become the length of the fault window. The drill
prints its plan (endpoints, load, every command) before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from smtpfleet.config import build_config
from smtpfleet.drills.context import DrillContext, Probe, Scenario, Step
from smtpfleet.drills.net_target import a_member_left, net_on_target, remember_members
from smtpfleet.drills.remote import RemoteCluster, RemoteSink
from smtpfleet.drills.target_file import (
    FaultCommands,
    Target,
    TargetError,
    load_target,
    missing_commands,
)
from smtpfleet.queue.connection import RedisClient

__all__ = [
    "FaultCommands",
    "Target",
    "TargetError",
    "TargetUnreachable",
    "check_reachable",
    "load_target",
    "missing_commands",
    "on_target",
    "plan",
    "remote_cluster",
]

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0
# Measured from the nodes' own logs or exit code, which a running cluster does not hand us.
# slot_moved: the Redis Cluster drills' probe reads the cluster they built.
LOCAL_ONLY_MEASURES = frozenset({"live_declared_dead", "exit_code", "slot_moved"})


# -- turning a scenario into one that acts through the target's commands ---------------------


def command_text(command: str, fault_s: float) -> str:
    """The command as it runs: `{fault_s}` and `{fault_ms}` filled in."""
    return command.replace("{fault_s}", f"{fault_s:g}").replace(
        "{fault_ms}", str(int(fault_s * 1000))
    )


async def run_command(ctx: DrillContext, command: str, fault_s: float) -> int | None:
    """Run one fault command to its end (or COMMAND_TIMEOUT_S); its exit status, also noted
    in the report. Cancelled (an interrupted drill), it kills the command first."""
    text = command_text(command, fault_s)
    started = ctx.notes.setdefault("commands_started", [])
    assert isinstance(started, list)
    started.append(text)
    # A session of its own: a timeout or an interrupt kills the whole command (the shell and
    # the kubectl or sleep it started), and a Ctrl-C at the terminal reaches the drill only,
    # which decides what to stop and what to heal.
    process = await asyncio.create_subprocess_shell(
        text,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        output = b"(timed out)"
        await _kill(process)
    except asyncio.CancelledError:
        await _kill(process)
        raise
    shown = output.decode(errors="replace")
    ran = ctx.notes.setdefault("commands", [])
    assert isinstance(ran, list)
    ran.append({"command": text, "exit": process.returncode, "output": shown[-500:]})
    if process.returncode != 0:
        log.warning("fault command exited %s: %s\n%s", process.returncode, text, shown)
    return process.returncode


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


@dataclass
class Aftermath:
    """What an interrupted target drill did to the cluster, filled in as the drill unwinds
    (the CLI says it): whether the fault was injected, and the heal command it then ran."""

    injected: bool = False
    heal: str | None = None  # the heal command run after the interrupt (None: none ran)
    heal_exit: int | None = None  # its exit status (None: it did not finish)


async def heal_after_interrupt(
    ctx: DrillContext, target: Target, name: str, fault_s: float, aftermath: Aftermath
) -> None:
    """An interrupted drill must not leave the operator's cluster broken: when the fault was
    injected and its heal command has not run to a good end, run it now."""
    commands = target.faults.get(name)
    started = ctx.notes.get("commands_started", [])
    assert isinstance(started, list)
    aftermath.injected = commands is not None and command_text(commands.inject, fault_s) in started
    if not aftermath.injected or commands is None or commands.heal is None:
        return
    heal = command_text(commands.heal, fault_s)
    ran = ctx.notes.get("commands", [])
    assert isinstance(ran, list)
    if any(c["command"] == heal and c["exit"] == 0 for c in ran):
        return
    aftermath.heal = heal
    aftermath.heal_exit = await run_command(ctx, commands.heal, fault_s)


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


class TargetUnreachable(RuntimeError):
    """The target's Redis or a recording relay does not answer: the drill could measure
    nothing (every accepted message would read as lost), so it does not start."""


async def check_reachable(target: Target, remote: RemoteCluster, redis: RedisClient) -> None:
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        where = target.redis.get("sentinels") or target.redis.get("url")
        raise TargetUnreachable(f"the target's Redis ({where}) does not answer: {exc}") from None
    for sink in remote.sinks:
        try:
            await sink.refresh()
        except (OSError, ValueError, KeyError) as exc:  # URLError is an OSError
            raise TargetUnreachable(
                f"the recording relay {sink.url} does not answer: {exc}"
            ) from None


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
