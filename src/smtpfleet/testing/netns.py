"""Network namespaces on a private switch, for faults in the network itself (issue #15).

A `Fabric` is a small switched network that exists only for one test run: a hub namespace
holding a Linux bridge, one namespace per member (Redis, each node) joined to the bridge by a
veth pair, and one veth from the test's own namespace, so the test's sinks and load generator
sit on the same wire. Every address is one the fabric created (10.231.X.0/24, X picked unused
per run) and every name carries a per-run id, so parallel runs do not clash.

Faults happen in the hub (the network), never in the processes:

- `cut(a, b)`: packets between two addresses vanish, both ways (a u32 filter on the hub ports
  redirects them to a veth that is down, which drops them; no iptables needed); `heal(cut)`.
- `link_down(member)` / `link_up(member)`: the member's cable is pulled.
- `impair(member, delay_ms=, loss_percent=)`: frames leaving the member are delayed or lost.
  With `sch_netem` in the kernel that is `tc qdisc add ... netem`; without it (some CI kernels,
  this one) a userspace forwarder in the hub (`testing.netem`) does the same to the frames.

`close()` kills every process left in the fabric's namespaces (by pid, from `ip netns pids`),
deletes the namespaces (their veths go with them) and the test's own veth. It runs when the
`with` block ends, and at interpreter exit for a fabric nobody closed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = ["Cut", "Fabric", "Member", "NetnsError", "unavailable_reason"]

SUBNET_BASE = "10.231"  # 10.231.X.0/24 per run
HOST_ADDRESS = 254  # the test's own address on the fabric; its extra ones from EXTRA_ADDRESS
EXTRA_ADDRESS = 200
BRIDGE = "br0"
BLACKHOLE = "bh0"  # a veth left down in the hub: whatever is redirected to it is dropped
READY_LINE = b"ready"
FORWARDER_START_S = 10.0
COMMAND_TIMEOUT_S = 10.0


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed; the message has the command and what it said."""


def _run(*argv: str, check: bool = True) -> str:
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
        _run("ip", "netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace here: {exc}"
    _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Member:
    """A namespace on the fabric: its name, address, and its port (veth end) in the hub."""

    role: str
    namespace: str
    address: str
    port: str  # the veth end in the hub, a bridge port
    inner: str  # the veth end inside the member's namespace


@dataclass(frozen=True)
class Cut:
    """Hub filters dropping the packets between two addresses: (port, filter pref) pairs."""

    a: str
    b: str
    filters: tuple[tuple[str, int], ...]


@dataclass
class _Impairment:
    member: Member
    forwarder: subprocess.Popen[bytes] | None  # None: kernel netem
    spare: tuple[str, str] = ("", "")  # the veth pair the forwarder uses (userspace only)


@dataclass
class Fabric:
    """The switch and its namespaces; a context manager that always cleans up."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = ""
    members: dict[str, Member] = field(default_factory=dict)
    host_addresses: list[str] = field(default_factory=list)
    _impairments: dict[str, _Impairment] = field(default_factory=dict)
    _next_pref: int = 100
    _started: bool = False

    @property
    def hub(self) -> str:
        return f"sf{self.run_id}-hub"

    @property
    def host_veth(self) -> str:
        return f"sf{self.run_id}t0"  # in the test's own namespace

    @property
    def host_port(self) -> str:
        return f"sf{self.run_id}t1"  # its peer, a bridge port in the hub

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.{HOST_ADDRESS}"

    def __enter__(self) -> Fabric:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        self.subnet = self.subnet or _unused_subnet()
        _OPEN.add(self)
        self._started = True
        hub = self.hub
        _run("ip", "netns", "add", hub)
        _run("ip", "-n", hub, "link", "set", "lo", "up")
        _run("ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "-n", hub, "link", "set", BRIDGE, "up")
        _run("ip", "-n", hub, "link", "add", BLACKHOLE, "type", "veth", "peer", "name", "bh1")
        _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", self.host_port)
        _run("ip", "link", "set", self.host_port, "netns", hub)
        self._plug(self.host_port)
        _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.host_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        self.host_addresses.append(self.host_address)

    def _plug(self, port: str) -> None:
        _run("ip", "-n", self.hub, "link", "set", port, "master", BRIDGE, "up")
        _run("tc", "-n", self.hub, "qdisc", "add", "dev", port, "clsact")

    def add_host_address(self) -> str:
        """One more address of the test's own namespace (a sink per relay, each its own)."""
        address = f"{self.subnet}.{EXTRA_ADDRESS + len(self.host_addresses)}"
        _run("ip", "addr", "add", f"{address}/24", "dev", self.host_veth)
        self.host_addresses.append(address)
        return address

    def add_member(self, role: str) -> Member:
        index = len(self.members) + 1
        member = Member(
            role=role,
            namespace=f"sf{self.run_id}-{role}",
            address=f"{self.subnet}.{index}",
            port=f"sf{self.run_id}p{index}",
            inner=f"sf{self.run_id}m{index}",
        )
        self.members[role] = member
        ns = member.namespace
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", member.inner, "type", "veth", "peer", "name", "x")
        _run("ip", "-n", ns, "link", "set", "x", "netns", self.hub)
        _run("ip", "-n", self.hub, "link", "set", "x", "name", member.port)
        self._plug(member.port)
        _run("ip", "-n", ns, "addr", "add", f"{member.address}/24", "dev", member.inner)
        _run("ip", "-n", ns, "link", "set", member.inner, "up")
        return member

    def exec_prefix(self, member: Member) -> list[str]:
        """Prefix an argv with this to run it inside the member's namespace (it execs)."""
        return ["ip", "netns", "exec", member.namespace]

    def _port_of(self, address: str) -> str:
        if address in self.host_addresses:
            return self.host_port
        for member in self.members.values():
            if member.address == address:
                return member.port
        raise NetnsError(f"{address} is not on this fabric")

    def cut(self, a: str, b: str) -> Cut:
        """Drop every IPv4 packet between addresses a and b (ARP still flows, as on a real
        network where a firewall drops the traffic)."""
        filters = []
        for src, dst in ((a, b), (b, a)):
            port, pref = self._port_of(src), self._next_pref
            self._next_pref += 1
            _run(
                *("tc", "-n", self.hub, "filter", "add", "dev", port, "ingress"),
                *("pref", str(pref), "protocol", "ip", "u32"),
                *("match", "ip", "src", f"{src}/32", "match", "ip", "dst", f"{dst}/32"),
                *("action", "mirred", "egress", "redirect", "dev", BLACKHOLE),
            )
            filters.append((port, pref))
        return Cut(a, b, tuple(filters))

    def partition(self, side_a: list[str], side_b: list[str]) -> list[Cut]:
        """Two islands: every address of one loses every address of the other."""
        return [self.cut(a, b) for a in side_a for b in side_b]

    def heal(self, cut: Cut) -> None:
        for port, pref in cut.filters:
            _run("tc", "-n", self.hub, "filter", "del", "dev", port, "ingress", "pref", str(pref))

    def link_down(self, member: Member) -> None:
        _run("ip", "-n", self.hub, "link", "set", member.port, "down")

    def link_up(self, member: Member) -> None:
        _run("ip", "-n", self.hub, "link", "set", member.port, "up")

    def impair(self, member: Member, *, delay_ms: int = 0, loss_percent: float = 0.0) -> str:
        """Delay or lose the frames leaving `member` (its replies, for Redis); returns the
        means used: "netem" (the kernel's) or "forwarder" (testing.netem, in userspace)."""
        current = self._impairments.get(member.role)
        if current is not None and current.forwarder is not None:
            _control(current.forwarder, delay_ms, loss_percent)  # changed in place, no gap
            return "forwarder"
        netem = [*(("delay", f"{delay_ms}ms") if delay_ms else ())]
        netem += [*(("loss", f"{loss_percent:g}%") if loss_percent else ())]
        verb = "change" if current is not None else "add"
        try:
            _run("ip", "netns", "exec", member.namespace, "tc", "qdisc", verb, "dev",
                 member.inner, "root", "netem", *netem)  # fmt: skip
        except NetnsError as exc:
            if "unknown" not in str(exc).lower():
                raise
        else:
            self._impairments[member.role] = _Impairment(member, None)
            return "netem"
        self._impairments[member.role] = self._forwarder(member, delay_ms, loss_percent)
        return "forwarder"

    def _forwarder(self, member: Member, delay_ms: int, loss_percent: float) -> _Impairment:
        """Take the member's port off the bridge and forward its frames in userspace, through
        a spare veth pair whose other end is on the bridge. The forwarder opens its sockets
        first and starts only once the port is off the bridge: the switch loses no frame."""
        index = member.port.rpartition("p")[2]
        spare = (f"sf{self.run_id}f{index}", f"sf{self.run_id}g{index}")
        hub = self.hub
        _run("ip", "-n", hub, "link", "add", spare[0], "type", "veth", "peer", "name", spare[1])
        _run("ip", "-n", hub, "link", "set", spare[0], "master", BRIDGE, "up")
        _run("ip", "-n", hub, "link", "set", spare[1], "up")
        process = subprocess.Popen(  # noqa: S603 - our interpreter and module
            [
                *("ip", "netns", "exec", hub, sys.executable, "-m", "smtpfleet.testing.netem"),
                *("--from", member.port, "--to", spare[1]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        impairment = _Impairment(member, process, spare)
        assert process.stdout is not None
        if process.stdout.readline().strip() != READY_LINE:
            self._stop_forwarder(impairment)
            raise NetnsError(f"the netem forwarder for {member.role} did not start")
        _run("ip", "-n", hub, "link", "set", member.port, "nomaster")
        _control(process, delay_ms, loss_percent)
        return impairment

    def unimpair(self, member: Member) -> None:
        impairment = self._impairments.pop(member.role, None)
        if impairment is None:
            return
        if impairment.forwarder is None:
            _run("ip", "netns", "exec", member.namespace, "tc", "qdisc", "del", "dev",
                 member.inner, "root", check=False)  # fmt: skip
            return
        # Back on the bridge first, then stop the forwarder: no gap (what it still holds
        # arrives late, or twice, which TCP takes in its stride).
        _run("ip", "-n", self.hub, "link", "set", member.port, "master", BRIDGE, check=False)
        self._stop_forwarder(impairment)

    def _stop_forwarder(self, impairment: _Impairment) -> None:
        process = impairment.forwarder
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout) if process is not None else ():
            if stream is not None:
                stream.close()
        if impairment.spare[0]:
            _run("ip", "-n", self.hub, "link", "del", impairment.spare[0], check=False)

    def close(self) -> None:
        """Kill what runs in our namespaces, delete them and our veth. Idempotent."""
        for impairment in list(self._impairments.values()):
            self._stop_forwarder(impairment)
        self._impairments.clear()
        if self._started:
            for namespace in [m.namespace for m in self.members.values()] + [self.hub]:
                _kill_inside(namespace)
                _run("ip", "netns", "del", namespace, check=False)
            # Deleting the hub destroyed our veth's peer, and so our veth; make sure.
            _run("ip", "link", "del", self.host_veth, check=False)
            self._started = False
        _OPEN.discard(self)

    def __hash__(self) -> int:
        return hash(self.run_id)


def _control(forwarder: subprocess.Popen[bytes], delay_ms: int, loss_percent: float) -> None:
    assert forwarder.stdin is not None
    forwarder.stdin.write(f"{delay_ms} {loss_percent}\n".encode())
    forwarder.stdin.flush()


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process still in one of our namespaces (only we start processes there)."""
    for pid in _run("ip", "netns", "pids", namespace, check=False).split():
        if pid.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)


def _unused_subnet() -> str:
    """A 10.231.X prefix no address or route of this machine uses now."""
    taken = _run("ip", "-4", "addr") + _run("ip", "-4", "route")
    free = [x for x in range(1, 255) if f"{SUBNET_BASE}.{x}." not in taken]
    if not free:
        raise NetnsError(f"every {SUBNET_BASE}.X/24 is in use")
    return f"{SUBNET_BASE}.{random.choice(free)}"


_OPEN: set[Fabric] = set()


@atexit.register
def _close_all() -> None:
    for fabric in list(_OPEN):
        with contextlib.suppress(Exception):
            fabric.close()
