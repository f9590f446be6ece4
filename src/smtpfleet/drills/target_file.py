"""The target file of `smtpfleet drill --target FILE`: read, checked key by key, and the
safety rule (every host loopback, or listed in `allow_hosts`).

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
    preset: kubernetes                 # or: fill `faults` with kubectl (drills.kubernetes)
    kubernetes: {namespace: mail}

The file is checked whole before anything runs, as a node's configuration is: every problem
is reported at once, on one line, each naming its key and what it expects
(`smtp[0]: expected HOST:PORT (a string), not 2525`).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smtpfleet.config import build_config, parse_hostport
from smtpfleet.drills.kubernetes import check_kubernetes, kubernetes_faults
from smtpfleet.errors import ConfigError

# A target file is a screenful of YAML; reading more would only let `--target /dev/zero` eat
# the machine's memory before the first check.
MAX_FILE_BYTES = 1024 * 1024
TOP_KEYS = (
    "name",
    "smtp",
    "redis",
    "sinks",
    "metrics",
    "relay",
    "allow_hosts",
    "faults",
    "preset",
    "kubernetes",
)
PRESETS = ("kubernetes",)
SHOWN_CHARS = 60  # of a bad value quoted in an error


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
        url = str(self.redis.get("url", ""))
        if url and not self.redis.get("sentinels") and not url.startswith("unix:"):
            hosts.add(urllib.parse.urlsplit(url).hostname or "")
        for key in ("sentinels", "cluster_nodes"):  # a Redis Cluster's seeds are hosts too
            hosts |= {parse_hostport(a)[0] for a in self.redis.get(key) or []}
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
    """The file, read and checked whole (TargetError: one line naming the file and the keys)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TargetError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return parse_target(parse_yaml(data, str(path)), str(path))


def parse_yaml(data: bytes, source: str) -> object:
    """The YAML document in `data`; TargetError saying where it is not YAML."""
    if len(data) > MAX_FILE_BYTES:
        raise TargetError(f"{source}: larger than {MAX_FILE_BYTES} bytes: not a target file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TargetError(
            f"{source}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}): "
            "expected a YAML target file"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TargetError(f"{source}: not valid YAML{where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        raise TargetError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise TargetError(f"{source}: nested too deeply to be a target file") from None


def parse_target(raw: object, source: str) -> Target:
    """A parsed document as a Target, every key checked; then the safety rule."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TargetError(
            f"{source}: expected a mapping of {', '.join(TOP_KEYS[:4])}, ..., not {_show(raw)}"
        )
    known = ", ".join(TOP_KEYS)
    problems = [f"{key}: unknown key (known: {known})" for key in raw if key not in TOP_KEYS]
    name = _name(raw.get("name", Path(source).stem), "name", problems)
    smtp = _endpoints(raw.get("smtp"), problems)
    redis = _redis(raw.get("redis"), problems)
    sinks = _urls(raw.get("sinks"), "sinks", problems, required=True)
    metrics = _urls(raw.get("metrics"), "metrics", problems, required=False)
    relay = _name(raw.get("relay", "relay-1"), "relay", problems)
    allow_hosts = _names(raw.get("allow_hosts"), "allow_hosts", problems)
    faults = _preset(raw, problems)
    faults.update(_faults(raw.get("faults"), problems))
    if problems:
        # One line, whatever a key or a message holds (a YAML key may carry a newline).
        raise TargetError(f"{source}: " + "; ".join(p.replace("\n", " ") for p in problems))
    target = Target(name, smtp, redis, sinks, faults, metrics, relay, allow_hosts)
    target.check_safe()
    return target


def _show(value: object) -> str:
    """A bad value as the error quotes it: short, on one line (repr escapes newlines)."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _list(value: object, key: str, what: str, problems: list[str], required: bool) -> list[object]:
    if value is None:
        if required:
            problems.append(f"{key}: missing (a list of {what})")
        return []
    if not isinstance(value, list) or (required and not value):
        problems.append(f"{key}: expected a list of {what}, not {_show(value)}")
        return []
    return value


def _endpoints(value: object, problems: list[str]) -> list[tuple[str, int]]:
    endpoints = []
    for i, item in enumerate(_list(value, "smtp", "HOST:PORT", problems, required=True)):
        try:
            if not isinstance(item, str):
                raise ValueError
            host, port = parse_hostport(item)
            if port == 0:
                raise ValueError
        except ValueError:
            problems.append(f"smtp[{i}]: expected HOST:PORT (a string), not {_show(item)}")
            continue
        endpoints.append((host, port))
    return endpoints


def _urls(value: object, key: str, problems: list[str], *, required: bool) -> list[str]:
    urls = []
    for i, item in enumerate(_list(value, key, "http:// URLs", problems, required)):
        if not isinstance(item, str) or not _http_url(item):
            problems.append(f"{key}[{i}]: expected an http:// URL, not {_show(item)}")
            continue
        urls.append(item.rstrip("/"))
    return urls


def _http_url(text: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # a port that is not a number (or out of range) raises here
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _name(value: object, key: str, problems: list[str]) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value):
        problems.append(f"{key}: expected a name, not {_show(value)}")
        return ""
    return str(value)


def _names(value: object, key: str, problems: list[str]) -> list[str]:
    items = _list(value, key, "host names", problems, required=False)
    return [_name(item, f"{key}[{i}]", problems) for i, item in enumerate(items)]


def _redis(value: object, problems: list[str]) -> dict[str, Any]:
    """`redis:`, checked as a node's `redis:` section is (the drill connects with it)."""
    if value is None:
        problems.append("redis: missing (a mapping with url, or sentinels and master_name)")
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"redis: expected a mapping with url (redis://...), not {_show(value)}")
        return {}
    if "url" in value and not isinstance(value["url"], str):
        problems.append(f"redis.url: expected a redis:// URL (a string), not {_show(value['url'])}")
        return {}
    try:
        build_config({"redis": dict(value)})
    except ConfigError as exc:
        # "invalid configuration: redis.url: ..." (one problem) or the heading and a line per
        # problem: each kept as the config check words it, naming its key.
        text = str(exc).removeprefix("invalid configuration:")
        for line in filter(None, (line.strip() for line in text.splitlines())):
            problems.append(line.replace("Value error, ", ""))
        return {}
    return dict(value)


def _preset(raw: Mapping[Any, Any], problems: list[str]) -> dict[str, FaultCommands]:
    preset = raw.get("preset")
    settings = check_kubernetes(raw.get("kubernetes"), problems)
    if preset is None:
        return {}
    if preset not in PRESETS:
        problems.append(f"preset: expected {' or '.join(PRESETS)}, not {_show(preset)}")
        return {}
    return {
        name: FaultCommands(inject, heal)
        for name, (inject, heal) in kubernetes_faults(settings).items()
    }


def _faults(raw: object, problems: list[str]) -> dict[str, FaultCommands]:
    """`faults:`, each entry checked, with errors that name the key."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append("faults: expected a mapping of scenario -> {inject, heal}")
        return {}
    faults = {}
    for name, commands in raw.items():
        if not isinstance(commands, Mapping) or not isinstance(commands.get("inject"), str):
            problems.append(f"faults.{name}.inject: missing (a shell command)")
            continue
        unknown = sorted(str(k) for k in set(commands) - {"inject", "heal"})
        if unknown:
            problems.append(f"faults.{name}.{unknown[0]}: unknown (inject, heal)")
            continue
        heal = commands.get("heal")
        if heal is not None and not isinstance(heal, str):
            problems.append(f"faults.{name}.heal: expected a shell command, not {_show(heal)}")
            continue
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
