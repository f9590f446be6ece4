"""PROXY protocol (HAProxy's v1 text and v2 binary header) decisions. Pure.

aiosmtpd parses the header (`aiosmtpd.proxy_protocol.get_proxy`); this module decides whom
to believe. Only a peer inside `trusted_proxies` may send one: anyone else could name any
address and pass the relay_networks check, so such a connection is closed before the banner.
The address it carries is then the client's for everything: relay_networks, the AUTH failure
limit, logs and the Received header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from aiosmtpd.proxy_protocol import AF, V2_CMD, ProxyData

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def in_networks(address: str, nets: Iterable[Network]) -> bool:
    """True when the IP (an IPv4-mapped IPv6 address counts as IPv4) is in one of the nets."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def well_formed(data: ProxyData) -> bool:
    """Whether a header aiosmtpd read is whole: its v2 TLVs (type, 16-bit length, value) must
    fill what follows the addresses exactly. aiosmtpd keeps them unread; a TLV running past
    the header's end means a broken or hostile proxy, and such a header names nobody."""
    if data.version != 2 or not data.tlv_start:
        return True
    rest = bytes(data.rest or b"")
    at = 0
    while at + 3 <= len(rest):
        at += 3 + int.from_bytes(rest[at + 1 : at + 3], "big")
    return at == len(rest)


def client_of(data: ProxyData) -> tuple[str, int] | None:
    """The client a valid header names; None when it names none (the proxy's own checks:
    v2 LOCAL, v1 UNKNOWN), and the connection is then taken as the proxy's own."""
    if data.version == 2 and data.command == V2_CMD.LOCAL:
        return None
    if data.family not in (AF.INET, AF.INET6) or data.src_addr is None:
        return None
    source: Any = data.src_addr
    return str(ipaddress.ip_address(source)), int(data.src_port or 0)
