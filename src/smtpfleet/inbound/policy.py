"""Inbound decisions on plain values: who may send where, and what data we refuse. Pure.

Open relays are made by addresses that a relay further on reads differently from us, so an
address is judged by every domain it could be routed to, not only the one after the last `@`:

- source routes ``<@a.example,@b.example:user@c.example>`` (RFC 5321 §4.1.2, appendix C):
  every hop counts;
- the percent hack ``user%foreign.example@ours.example``: ``foreign.example`` counts;
- bang paths ``foreign.example!user@ours.example``: ``foreign.example`` counts;
- a quoted local part with an ``@`` (``"user@foreign.example"@ours.example``): likewise;
- domain literals ``user@[192.0.2.1]`` are never one of our accepted domains.

A client outside the relay networks may only send to addresses whose every routing domain is
an accepted domain.

SMTP smuggling policy (RFC 5321 §2.3.8): only CRLF ends a line and only CRLF.CRLF ends DATA
(aiosmtpd reads DATA with ``readuntil(b"\\r\\n")``). A message with a bare CR or bare LF anywhere
is refused whole with a 550: we never guess which line ending the client meant, so a bare line
ending can neither end DATA early nor reach a relay, where it might.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from datetime import datetime

from smtpfleet import replies

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_LOCAL_SAFE = re.compile(r"^[^\s<>()\[\],;:\\\"]+$")
MAX_HELO = 100
_HEADER_END = b"\r\n\r\n"
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*((?:[^\r\n]|\r\n[ \t])*)")
_RECEIVED = re.compile(rb"(?im)^received:")


def _valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return False
        return True
    labels = domain.rstrip(".").split(".")
    return len(domain) <= 255 and all(_LABEL.match(label) for label in labels)


def _split_address(address: str) -> tuple[str, str] | None:
    """(local part, domain) at the last @ outside quotes; a quoted local part is unquoted."""
    if address.startswith('"'):
        end = address.find('"', 1)
        while end > 0 and address[end - 1] == "\\":
            end = address.find('"', end + 1)
        if end < 0 or not address[end + 1 :].startswith("@"):
            return None
        return address[1:end].replace("\\", ""), address[end + 2 :]
    local, at, domain = address.rpartition("@")
    if not at or not local or not _LOCAL_SAFE.match(local):
        return None
    return local, domain


def _local_part_domains(local: str) -> set[str]:
    """Domains hidden in a local part by the percent hack, bang paths or a quoted @."""
    found: set[str] = set()
    if "@" in local:
        found.add(local.rpartition("@")[2])
    if "%" in local:
        found.add(local.rpartition("%")[2])
    if "!" in local:
        found.add(local.partition("!")[0])
    return {d.lower().rstrip(".") for d in found}


def routing_domains(address: str) -> frozenset[str] | None:
    """Every domain the address could be routed to, lowercased; None if it is not an address."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    hops: list[str] = []
    if text.startswith("@"):
        route, colon, text = text.partition(":")
        if not colon:
            return None
        hops = [hop.strip().lstrip("@") for hop in route.split(",")]
    parts = _split_address(text)
    if parts is None:
        return None
    local, domain = parts
    domains = {d.lower().rstrip(".") for d in [*hops, domain]} | _local_part_domains(local)
    if not all(d and _valid_domain(d) for d in domains):
        return None
    return frozenset(domains)


class RecipientPolicy:
    def __init__(self, accepted_domains: Iterable[str], relay_networks: Iterable[str]) -> None:
        self._accepted = frozenset(d.lower().rstrip(".") for d in accepted_domains)
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in relay_networks)

    def is_relay_client(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def check(self, recipient: str, client_ip: str) -> str | None:
        """None when the recipient is acceptable from this client, else the reply to send."""
        domains = routing_domains(recipient)
        if domains is None:
            return replies.BAD_ADDRESS
        if self.is_relay_client(client_ip) or domains <= self._accepted:
            return None
        return replies.RELAY_DENIED

    @staticmethod
    def check_sender(sender: str) -> str | None:
        if sender in ("", "<>"):
            return None  # the null reverse-path: bounces and other notifications
        return None if routing_domains(sender) is not None else replies.BAD_SENDER


def header_section(data: bytes) -> bytes:
    end = data.find(_HEADER_END)
    return data if end < 0 else data[: end + 2]


def count_received_headers(data: bytes) -> int:
    return len(_RECEIVED.findall(header_section(data)))


def message_id(data: bytes) -> str | None:
    match = _MESSAGE_ID.search(header_section(data))
    if match is None:
        return None
    value = b" ".join(match.group(1).split()).decode("ascii", "replace")
    return value or None


def has_bare_line_ending(data: bytes) -> bool:
    """A CR not followed by LF, or an LF not preceded by CR, anywhere in the data."""
    if b"\r" not in data and b"\n" not in data:
        return False
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


def sanitize_helo(helo: str | None) -> str:
    """The client's HELO goes into a header: keep it one short printable token."""
    text = "".join(c for c in (helo or "") if c.isprintable() and not c.isspace() and c not in "()")
    return text[:MAX_HELO] or "unknown"


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    by_host: str,
    qid: str,
    recipient: str | None,
    when: datetime,
    esmtp: bool = True,
) -> bytes:
    """RFC 5321 §4.4 trace header; `for` only names a single recipient (privacy)."""
    protocol = "ESMTP" if esmtp else "SMTP"
    lines = [
        f"Received: from {sanitize_helo(helo)} ([{peer_ip}])",
        f"\tby {by_host} (smtpfleet) with {protocol} id {qid}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>")
    lines[-1] += f"; {when.strftime('%a, %d %b %Y %H:%M:%S %z')}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
