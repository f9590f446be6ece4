"""A stand-in `kubectl` that records every call and acts on local processes instead of pods.

It lets the Kubernetes preset of `smtpfleet drill --target` run in CI: install it on PATH
(`install`), describe the local cluster in a state file, and each kubectl call the preset
makes is logged (one JSON line per call) and mapped to what it would do to a pod:

| kubectl call | here |
|---|---|
| `get pods -l SELECTOR -o name` | `pod/NAME` of each listed process still alive |
| `delete pod/NAME --grace-period=0 --force` | SIGKILL its process |
| `delete pod/NAME` | SIGTERM (the pod's grace period: the node drains) |
| `scale deployment/RELAY --replicas=N` | the recording relay stops (0) or resumes listening |
| `exec deployment/RELAY -- tc qdisc add ... delay Nms` / `del` | the relay slows down / not |
| `exec POD -c CONTAINER -- redis-cli [-p PORT] ARGS` | ARGS against that container's port |

State file (JSON): {"log": PATH, "pods": {NAME: PID}, "relays": {NAME: CONTROL_URL},
"redis": {POD: {CONTAINER: PORT}}}. Anything else exits 1 with "unsupported".
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import redis

from smtpfleet.testing.recording_relay import control

STATE_ENV = "SMTPFLEET_FAKE_KUBECTL_STATE"


def install(bin_dir: Path, state_path: Path) -> Path:
    """Write an executable `kubectl` into bin_dir that runs this module with this state."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "kubectl"
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    script.write_text(
        "#!/bin/sh\n"
        f"export {STATE_ENV}='{state_path}'\n"
        f"export PYTHONPATH='{pythonpath}'\n"
        f"exec '{sys.executable}' -m smtpfleet.testing.fake_kubectl \"$@\"\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def _strip_globals(args: list[str]) -> list[str]:
    """Drop --namespace/--context/-n and their values: there is one namespace here."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--namespace", "-n", "--context"):
            skip = True
        elif not arg.startswith(("--namespace=", "--context=")):
            out.append(arg)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _get_pods(state: dict[str, Any]) -> int:
    for name, pid in state["pods"].items():
        if _alive(int(pid)):
            print(f"pod/{name}")
    return 0


def _delete(state: dict[str, Any], args: list[str]) -> int:
    name = args[0].removeprefix("pod/")
    force = "--grace-period=0" in args
    os.kill(int(state["pods"][name]), signal.SIGKILL if force else signal.SIGTERM)
    print(f'pod "{name}" deleted')
    return 0


def _scale(state: dict[str, Any], args: list[str]) -> int:
    name = args[0].removeprefix("deployment/")
    replicas = next(a.split("=", 1)[1] for a in args if a.startswith("--replicas="))
    control(state["relays"][name], [f"listening={0 if replicas == '0' else 1}"])
    print(f"deployment.apps/{name} scaled")
    return 0


def _exec(state: dict[str, Any], args: list[str]) -> int:
    where, command = args[: args.index("--")], args[args.index("--") + 1 :]
    pod = where[0]
    if command[:2] == ["tc", "qdisc"]:
        delay = next((a for a in command if a.endswith("ms")), "0ms")
        delay_s = int(delay.removesuffix("ms")) / 1000 if command[2] == "add" else 0.0
        control(state["relays"][pod.removeprefix("deployment/")], [f"delay_s={delay_s}"])
        return 0
    if command[0] != "redis-cli":
        return _unsupported(args)
    container = where[where.index("-c") + 1] if "-c" in where else "redis"
    port = int(state["redis"][pod][container])
    words = command[1:]
    if words[:1] == ["-p"]:
        port, words = int(words[1]), words[2:]
    with redis.Redis("127.0.0.1", port, socket_timeout=5.0, decode_responses=True) as client:
        print(client.execute_command(*words))
    return 0


def _unsupported(args: list[str]) -> int:
    print(f"fake kubectl: unsupported: {' '.join(args)}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    state = json.loads(Path(os.environ[STATE_ENV]).read_text(encoding="utf-8"))
    with Path(state["log"]).open("a", encoding="utf-8") as log:
        log.write(json.dumps(raw) + "\n")
    args = _strip_globals(raw)
    verb, rest = (args[0], args[1:]) if args else ("", [])
    if verb == "get" and rest[:1] == ["pods"]:
        return _get_pods(state)
    handlers = {"delete": _delete, "scale": _scale, "exec": _exec}
    if verb in handlers:
        return handlers[verb](state, rest)
    return _unsupported(raw)


if __name__ == "__main__":
    sys.exit(main())
