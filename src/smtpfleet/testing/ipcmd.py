"""`ip` and `tc` for the network-fault tests: run them, say whether this machine can, and
clean up after a run that could not clean up itself.

A run marks itself in OWNERS_DIR (its id, its pid) while its namespaces exist; a run killed
with SIGKILL leaves the mark behind, and the next run's `sweep_stale()` removes what it left
(its namespaces, the processes in them, its veth in the test's namespace).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["NetnsError", "kill_inside", "run", "sweep_stale", "unavailable_reason"]

COMMAND_TIMEOUT_S = 10.0
OWNERS_DIR = Path("/run/smtpfleet-netns")  # root only, like everything here


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed; the message has the command and what it said."""


def run(*argv: str, check: bool = True) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - ip/tc with arguments we built
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot run the network-fault tests, in plain words; None if it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return f"network namespaces need root (this runs as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network namespaces need the `{tool}` command (iproute2), not on PATH"
    probe = f"sfprobe{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace here: {exc}"
    run("ip", "netns", "del", probe, check=False)
    return None


def kill_inside(namespace: str) -> None:
    """SIGKILL every process still in one of our namespaces (only we start processes there)."""
    for pid in run("ip", "netns", "pids", namespace, check=False).split():
        if pid.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)


def mark(run_id: str) -> None:
    """Note that this process owns the run's namespaces (best effort: no /run, no sweep)."""
    with contextlib.suppress(OSError):
        OWNERS_DIR.mkdir(mode=0o700, exist_ok=True)
        (OWNERS_DIR / run_id).write_text(str(os.getpid()), encoding="utf-8")


def unmark(run_id: str) -> None:
    with contextlib.suppress(OSError):
        (OWNERS_DIR / run_id).unlink(missing_ok=True)


def sweep_stale() -> list[str]:
    """Remove what runs whose process is gone left behind; the run ids swept."""
    swept = []
    for owner in OWNERS_DIR.glob("*") if OWNERS_DIR.is_dir() else ():
        if _alive(owner.read_text(encoding="utf-8").strip()):
            continue
        for line in run("ip", "netns", "list", check=False).splitlines():
            namespace = line.split(" ", 1)[0]
            if namespace.startswith(f"sf{owner.name}-"):
                kill_inside(namespace)
                run("ip", "netns", "del", namespace, check=False)
        run("ip", "link", "del", f"sf{owner.name}t0", check=False)
        owner.unlink(missing_ok=True)
        swept.append(owner.name)
    return swept


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
