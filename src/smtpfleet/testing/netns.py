"""Network namespaces on a private switch, for faults in the network itself (issue #15).

A `Fabric` is a small switched network that exists only for one test run: a hub namespace
holding a Linux bridge, one namespace per member (Redis, each node) joined to the bridge by a
veth pair, and one veth from the test's own namespace, so the test's sinks and load generator
sit on the same wire. Every address is one the fabric created (10.231.X.0/24, X picked unused
per run) and every name carries a per-run id, so parallel runs do not clash. `Fabric(ipv6=True)`
gives every address an IPv6 twin (fd5f:<run id>::/64, a ULA prefix, `nodad` so it is usable at
once) and makes the twin the one members are known by (`Member.address`): the cluster runs on
IPv6, and the IPv4 address stays only so the cut can be shown to take both.

Faults happen in the hub (the network), never in the processes:

- `cut(a, b)`: packets between two addresses vanish, both ways (a u32 filter on the hub ports
  redirects them to a veth that is down, which drops them; no iptables needed), and between
  their twins of the other family when they have some; `heal(cut)`. (`testing.netcut` does
  the same as a command, for target files.)
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
import ipaddress
import random
import secrets
from dataclasses import dataclass, field

from smtpfleet.testing import ipcmd
from smtpfleet.testing.impairment import Impairments, Link
from smtpfleet.testing.ipcmd import NetnsError, kill_inside, unavailable_reason
from smtpfleet.testing.ipcmd import run as _run
from smtpfleet.testing.launched import Launched
from smtpfleet.testing.netcut import BLACKHOLE, BRIDGE, drop_args

__all__ = ["Cut", "Fabric", "Member", "NetnsError", "unavailable_reason"]

SUBNET_BASE = "10.231"  # 10.231.X.0/24 per run
ULA_PREFIX = 0xFD5F  # fd5f:<run id>::/64 per run, for an IPv6 fabric
HOST_ADDRESS = 254  # the test's own address on the fabric; its extra ones from EXTRA_ADDRESS
EXTRA_ADDRESS = 200


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
    ipv6: bool = False  # members are known by IPv6 addresses (their IPv4 twins stay)
    members: dict[str, Member] = field(default_factory=dict)
    host_addresses: list[str] = field(default_factory=list)
    twins: dict[str, str] = field(default_factory=dict)  # each address <-> its other family's
    _ports: dict[str, str] = field(default_factory=dict)  # address -> its port in the hub
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
    def started(self) -> bool:
        return self._started

    @property
    def host_address(self) -> str:
        return self.host_addresses[0]

    @property
    def subnet6(self) -> ipaddress.IPv6Network:
        """This run's IPv6 prefix: fd5f:<run id>::/64 (a ULA prefix, RFC 4193)."""
        return ipaddress.IPv6Network((ULA_PREFIX << 112 | int(self.run_id, 16) << 64, 64))

    @property
    def networks(self) -> list[str]:
        """The fabric's prefixes, the one members are known by first."""
        four = f"{self.subnet}.0/24"
        return [str(self.subnet6), four] if self.ipv6 else [four]

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
        self.host_addresses.append(self._assign(HOST_ADDRESS, self.host_veth, self.host_port))
        _run("ip", "link", "set", self.host_veth, "up")

    def _assign(self, index: int, device: str, port: str, namespace: str | None = None) -> str:
        """Give `device` the fabric's address number `index` (and its IPv6 twin on an IPv6
        fabric); the address the member is known by."""
        where = ("-n", namespace) if namespace else ()
        four = f"{self.subnet}.{index}"
        _run("ip", *where, "addr", "add", f"{four}/24", "dev", device)
        self._ports[four] = port
        if not self.ipv6:
            return four
        six = str(self.subnet6[index])
        # nodad: duplicate address detection would hold the address "tentative" for a second
        # or more, and nothing else on this private wire can have it.
        _run("ip", *where, "-6", "addr", "add", f"{six}/64", "dev", device, "nodad")
        self._ports[six] = port
        self.twins[four], self.twins[six] = six, four
        return six

    def _plug(self, port: str) -> None:
        _run("ip", "-n", self.hub, "link", "set", port, "master", BRIDGE, "up")
        _run("tc", "-n", self.hub, "qdisc", "add", "dev", port, "clsact")

    def add_host_address(self) -> str:
        """One more address of the test's own namespace (a sink per relay, each its own)."""
        index = EXTRA_ADDRESS + len(self.host_addresses)
        address = self._assign(index, self.host_veth, self.host_port)
        self.host_addresses.append(address)
        return address

    def add_member(self, role: str) -> Member:
        index = len(self.members) + 1
        ns, port, inner = (
            f"sf{self.run_id}-{role}",
            f"sf{self.run_id}p{index}",
            f"sf{self.run_id}m{index}",
        )
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", inner, "type", "veth", "peer", "name", "x")
        _run("ip", "-n", ns, "link", "set", "x", "netns", self.hub)
        _run("ip", "-n", self.hub, "link", "set", "x", "name", port)
        self._plug(port)
        address = self._assign(index, inner, port, ns)
        _run("ip", "-n", ns, "link", "set", inner, "up")
        member = Member(role=role, namespace=ns, address=address, port=port, inner=inner)
        self.members[role] = member
        return member

    def exec_prefix(self, member: Member) -> list[str]:
        """Prefix an argv with this to run it inside the member's namespace (it execs)."""
        return ["ip", "netns", "exec", member.namespace]

    def _port_of(self, address: str) -> str:
        port = self._ports.get(address)
        if port is None:
            raise NetnsError(f"{address} is not on this fabric")
        return port

    def cut(self, a: str, b: str) -> Cut:
        """Drop every packet between addresses a and b, and between their twins of the other
        family when both have one (ARP still flows, as on a real network where a firewall drops
        the traffic; IPv6 neighbour discovery to the peer's unicast address does not)."""
        pairs = [(a, b)]
        if a in self.twins and b in self.twins:
            pairs.append((self.twins[a], self.twins[b]))
        filters = []
        for x, y in pairs:
            for src, dst in ((x, y), (y, x)):
                port, pref = self._port_of(src), self._next_pref
                self._next_pref += 1
                _run("tc", "-n", self.hub, "filter", "add", "dev", port, "ingress",
                     "pref", str(pref), *drop_args(src, dst))  # fmt: skip
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
