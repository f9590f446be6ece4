"""Packet drops in a fabric's hub, for either address family, and as a command of its own.

`testing.netns.Fabric.cut` uses `drop_args` for the pairs it knows. A drill against a running
cluster (`smtpfleet drill net-redis-cut --target FILE`) can only run commands, so the same
cut is a command too, acting on a hub namespace by its name:

    python -m smtpfleet.testing.netcut cut sfab12cd-hub 10.231.7.2 10.231.7.1
    python -m smtpfleet.testing.netcut heal sfab12cd-hub 10.231.7.2 10.231.7.1

More pairs may follow the first (a partition is every pair across the two islands).
It puts the filters on every port of the hub's bridge (a packet enters the hub only on its
sender's port, so the others never match) under a preference derived from the pair, so the
heal finds them without any state kept between the two commands.

A filter with `protocol ip` never sees an IPv6 packet: an IPv6 pair gets `protocol ipv6` and
`match ip6` (the cluster on an IPv6 fabric would otherwise talk straight through a "cut").
"""

from __future__ import annotations

import ipaddress
import sys
import zlib

from smtpfleet.testing.ipcmd import run

__all__ = ["BLACKHOLE", "BRIDGE", "cut_in_hub", "drop_args", "heal_in_hub", "pair_pref"]

BRIDGE = "br0"
BLACKHOLE = "bh0"  # a veth left down in the hub: whatever is redirected to it is dropped
# Preferences of the command's filters: above the ones a Fabric hands out (from 100 upwards).
COMMAND_PREF_BASE = 20000
COMMAND_PREF_SPAN = 10000
USAGE = "usage: python -m smtpfleet.testing.netcut cut|heal HUB_NAMESPACE A B [A B ...]"


def drop_args(src: str, dst: str) -> tuple[str, ...]:
    """`tc filter` arguments after the preference: packets src -> dst go to the blackhole."""
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise ValueError(f"{src} and {dst} are of different address families")
    six = ipaddress.ip_address(src).version == 6
    protocol, field, length = ("ipv6", "ip6", 128) if six else ("ip", "ip", 32)
    return (
        *("protocol", protocol, "u32"),
        *("match", field, "src", f"{src}/{length}", "match", field, "dst", f"{dst}/{length}"),
        *("action", "mirred", "egress", "redirect", "dev", BLACKHOLE),
    )


def pair_pref(a: str, b: str) -> int:
    """The same preference for (a, b) and (b, a), in every process."""
    key = "|".join(sorted((str(ipaddress.ip_address(a)), str(ipaddress.ip_address(b)))))
    return COMMAND_PREF_BASE + zlib.crc32(key.encode()) % COMMAND_PREF_SPAN


def bridge_ports(hub: str) -> list[str]:
    lines = run("ip", "-n", hub, "-o", "link", "show", "master", BRIDGE).splitlines()
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in lines if ":" in line]


def cut_in_hub(hub: str, a: str, b: str) -> int:
    """Drop every packet between a and b, both ways, in the hub; the preference used."""
    pref = pair_pref(a, b)
    for port in bridge_ports(hub):
        for src, dst in ((a, b), (b, a)):
            run("tc", "-n", hub, "filter", "add", "dev", port, "ingress", "pref", str(pref),
                *drop_args(src, dst))  # fmt: skip
    return pref


def heal_in_hub(hub: str, a: str, b: str) -> None:
    pref = str(pair_pref(a, b))
    for port in bridge_ports(hub):
        run("tc", "-n", hub, "filter", "del", "dev", port, "ingress", "pref", pref, check=False)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    addresses = args[2:]
    if args[:1] not in (["cut"], ["heal"]) or not addresses or len(addresses) % 2:
        print(USAGE, file=sys.stderr)
        return 2
    verb, hub = args[:2]
    for a, b in zip(addresses[::2], addresses[1::2], strict=True):
        if verb == "cut":
            print(f"cut {a} <-> {b} in {hub} (pref {cut_in_hub(hub, a, b)})")
        else:
            heal_in_hub(hub, a, b)
            print(f"healed {a} <-> {b} in {hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
