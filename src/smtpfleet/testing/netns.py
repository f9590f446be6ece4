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
  this one) a userspace forwarder in the hub (`testing.netem`) does the same to the frames
  (`testing.impairment`).

`close()` kills every process left in the fabric's namespaces (by pid, from `ip netns pids`),
deletes the namespaces (their veths go with them) and the test's own veth. It runs when the
`with` block ends, and at interpreter exit for a fabric nobody closed; what a run killed with
SIGKILL left is swept by the next one (`ipcmd.sweep_stale`).
"""

from __future__ import annotations

import atexit
import contextlib
import random
import secrets
from dataclasses import dataclass, field

from smtpfleet.testing import ipcmd
from smtpfleet.testing.impairment import Impairments, Link
from smtpfleet.testing.ipcmd import NetnsError, kill_inside, unavailable_reason
from smtpfleet.testing.ipcmd import run as _run
from smtpfleet.testing.launched import Launched

__all__ = ["Cut", "Fabric", "Member", "NetnsError", "unavailable_reason"]

SUBNET_BASE = "10.231"  # 10.231.X.0/24 per run
HOST_ADDRESS = 254  # the test's own address on the fabric; its extra ones from EXTRA_ADDRESS
EXTRA_ADDRESS = 200
BRIDGE = "br0"
BLACKHOLE = "bh0"  # a veth left down in the hub: whatever is redirected to it is dropped


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
class Fabric(Launched):
    """The switch and its namespaces; a context manager that always cleans up."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = ""
    members: dict[str, Member] = field(default_factory=dict)
    host_addresses: list[str] = field(default_factory=list)
    _impairments: Impairments | None = None
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

    def start(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        ipcmd.sweep_stale()  # what a run killed with SIGKILL left behind
        self.subnet = self.subnet or _unused_subnet()
        _OPEN.add(self)
        ipcmd.mark(self.run_id)
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
        """Delay or lose the frames leaving `member` (its replies, for Redis); a second call
        changes the figures in place. Returns the means: "netem" (the kernel's) or
        "forwarder" (testing.netem, in userspace, where the kernel has no sch_netem)."""
        if self._impairments is None:
            self._impairments = Impairments.of(self.hub, BRIDGE, f"sf{self.run_id}")
        return self._impairments.set(_link(member), delay_ms, loss_percent)

    def unimpair(self, member: Member) -> None:
        if self._impairments is not None:
            self._impairments.clear(_link(member))

    def close(self) -> None:
        """Kill what runs in our namespaces, delete them and our veth. Idempotent."""
        if self._impairments is not None:
            self._impairments.stop_all()
        if self._started:
            for namespace in [m.namespace for m in self.members.values()] + [self.hub]:
                kill_inside(namespace)
                _run("ip", "netns", "del", namespace, check=False)
            # Deleting the hub destroyed our veth's peer, and so our veth; make sure.
            _run("ip", "link", "del", self.host_veth, check=False)
            ipcmd.unmark(self.run_id)
            self._started = False
        _OPEN.discard(self)

    def __hash__(self) -> int:
        return hash(self.run_id)


def _link(member: Member) -> Link:
    return Link(member.namespace, member.inner, member.port)


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
