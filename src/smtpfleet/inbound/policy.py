"""Inbound decisions on plain values: who may send where, and what data we refuse. Pure.

Open relays are made by addresses that a relay further on reads differently from us, so an
address is judged by every host it could be routed through, not only the one after the last `@`
(`routing_domains`):

- source routes ``<@a.example,@b.example:user@c.example>`` (RFC 5321 §4.1.2, §3.6.1, appendix
  C): an old relay would send to the FIRST hop, so every hop counts, not only ``c.example``
  (aiosmtpd already drops the route from RCPT, so on the wire only the last domain remains);
- the percent hack ``user%foreign.example@ours.example``: ``foreign.example`` counts;
- bang paths ``foreign.example!user@ours.example``: ``foreign.example`` counts;
- a quoted local part with an ``@`` (``"user@foreign.example"@ours.example``): likewise;
- address literals ``user@[192.0.2.1]`` / ``user@[IPv6:::1]`` are hosts of their own and never
  one of our accepted domains.

A client outside the relay networks may only send to addresses whose every routing host is an
accepted domain. Relay clients are trusted to send anywhere, but still only to valid addresses.
Hidden hosts (``%``, ``!``, a quoted ``@``) are legal characters of a local part (RFC 5321
§4.1.2), so they never make an address invalid; they only make it foreign.

SMTP smuggling policy (RFC 5321 §2.3.8, §4.1.1.4): only CRLF ends a line and only CRLF.CRLF ends
DATA (aiosmtpd 1.4.6 reads DATA with ``readuntil(b"\\r\\n")`` and ends it only on a line that is
exactly ``.\\r\\n``). A message with a bare CR or bare LF anywhere is refused whole with a 550:
we never guess which line ending the client meant, so a bare line ending can neither end DATA
early here nor reach a relay, where it might. aiosmtpd undoes dot-stuffing on input (RFC 5321
§4.5.2); the relay client stuffs again on output.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Final

from smtpfleet import replies
from smtpfleet.config import InboundConfig
from smtpfleet.inbound.syntax import valid_literal

MAX_HELO: Final = 100
# The header section read on the accept path: past it, the message is refused (552 5.3.4). A
# 20 MB message of one field and millions of continuation lines took 600 MB beyond the
# receiving budget and held the event loop 2.5 s. Real header sections are kilobytes; a
# mailing list's long To: or a deep Received chain stays far below this.
MAX_HEADER_BYTES: Final = 1024 * 1024
NULL_PATHS: Final = frozenset({"", "<>"})
RELAY_CLIENTS_KEPT: Final = 4096  # client addresses whose relay_networks answer is kept

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# RFC 5321 §4.1.2 Dot-string: atext and dots. Lenient on dot placement ("a..b" exists in the
# wild and cannot route anywhere else); strict on everything that could.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_QTEXT_OR_PAIR = re.compile(r"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")
_HIDDEN_HOST_SEP = re.compile(r"[%@]")
_QUOTED_PAIR = re.compile(r"\\(.)")
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)", re.DOTALL)
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.:_\[\]-]")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Mailbox:
    """A parsed RFC 5321 path: optional source route, unquoted local part, domain."""

    route: tuple[str, ...]  # source-route hops in order, lowercased
    local: str  # quotes and quoted-pairs undone
    domain: str  # lowercased, trailing dot removed; "[...]" for an address literal

    @property
    def hidden_hosts(self) -> tuple[str, ...]:
        """Hosts named inside the local part, in the order an old relay would use them.

        ``a!b!user`` goes to a, then b (UUCP); ``user%b%a`` goes to a, then b (the relay strips
        the last ``%``). Mixed forms name every host either reading would use.
        """
        *bang_hosts, rest = self.local.split("!")
        _user, *at_hosts = _HIDDEN_HOST_SEP.split(rest)
        return tuple(_normal_host(h) for h in (*bang_hosts, *reversed(at_hosts)))

    @property
    def next_hop(self) -> str:
        """The host an old relay holding this address would send it to next."""
        return (*self.route, *self.hidden_hosts, self.domain)[0]


def _normal_host(host: str) -> str:
    return host.strip().lower().removesuffix(".")


def _valid_domain(domain: str) -> bool:
    """A lowercased domain without its trailing dot, or an address literal."""
    if domain.startswith("[") and domain.endswith("]"):
        return valid_literal(domain)
    return 0 < len(domain) <= 253 and all(_LABEL.fullmatch(x) for x in domain.split("."))


def _split_quoted(text: str) -> tuple[str, str] | None:
    """``"local"@domain`` → (unquoted local, domain), or None."""
    match = _QTEXT_OR_PAIR.match(text, 1)
    end = match.end() if match else 1
    if text[end : end + 2] != '"@':
        return None
    return re.sub(r"\\(.)", r"\1", text[1:end]), text[end + 2 :]


def _split_mailbox(text: str) -> tuple[str, str] | None:
    """(local part, domain) of ``local@domain``; the local part unquoted."""
    if text.startswith('"'):
        return _split_quoted(text)
    local, at, domain = text.rpartition("@")
    if not at or not _DOT_STRING.fullmatch(local):
        return None
    return local, domain


def _split_route(text: str) -> tuple[tuple[str, ...], str] | None:
    """RFC 5321 §4.1.2 ``@one,@two:mailbox`` → (hops, mailbox); no route → ((), text)."""
    if not text.startswith("@"):
        return (), text
    route, colon, mailbox = text.partition(":")
    hops = route.split(",")
    if not colon or not all(hop.startswith("@") for hop in hops):
        return None
    return tuple(_normal_host(hop[1:]) for hop in hops), mailbox


def parse_mailbox(address: str) -> Mailbox | None:
    """The path of MAIL FROM / RCPT TO (angle brackets optional); None if it is not valid."""
    # No strip(): a blank or control character anywhere makes the address invalid, and what
    # is judged here is exactly what gets stored and sent on.
    text = address
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    routed = _split_route(text)
    parts = _split_mailbox(routed[1]) if routed else None
    if routed is None or parts is None:
        return None
    mailbox = Mailbox(route=routed[0], local=parts[0], domain=_normal_host(parts[1]))
    if not parts[0] or not all(_valid_domain(d) for d in (*mailbox.route, mailbox.domain)):
        return None
    return mailbox


def routing_domains(address: str) -> frozenset[str] | None:
    """Every host the address could be routed through, lowercased; None if it is invalid."""
    mailbox = parse_mailbox(address)
    if mailbox is None:
        return None
    return frozenset((*mailbox.route, *mailbox.hidden_hosts, mailbox.domain))


def recipient_key(address: str) -> str:
    """What makes two recipients of a transaction the same mailbox, for a path that
    syntax.parse_path accepted: the domain in any case and the local part exactly (RFC 5321
    §2.4), except that "postmaster" is case-insensitive (§4.5.1) and a quoted local part is
    its content (RFC 5322 §3.2.4: a quoted-string is, semantically, the atom it quotes)."""
    local, _, domain = address.rpartition("@")
    if local.startswith('"'):
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if local.lower() == "postmaster":
        local = "postmaster"
    return f"{local}@{domain.lower()}"


def effective_domain(address: str) -> str | None:
    """The host mail for this address would really go to next; None if it is invalid."""
    mailbox = parse_mailbox(address)
    return None if mailbox is None else mailbox.next_hop


class RecipientPolicy:
    """Who may send to whom: the open-relay guard (RFC 5321 §3.6.2, §7.1)."""

    def __init__(self, accepted_domains: Iterable[str], relay_networks: Iterable[str]) -> None:
        # An address literal is never "ours", even if someone lists one.
        normal = (_normal_host(d) for d in accepted_domains)
        ours = [d for d in normal if d and not d.startswith("[")]
        self._accepted = frozenset(ours)
        # RCPT TO:<Postmaster> (RFC 5321 §4.1.1.3) goes to postmaster at the first accepted
        # domain: Postfix appends $myorigin, which admins set to their primary domain
        # ($mydomain). Not the node's hostname: the relays behind us take mail for the
        # accepted domains, not for our node names. None: no domain to complete it with.
        self.postmaster = f"postmaster@{ours[0]}" if ours else None
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in relay_networks)
        # Asked at every RCPT, 10 us to parse: the answer is kept per client address.
        self._relay_client = functools.lru_cache(maxsize=RELAY_CLIENTS_KEPT)(
            self._in_relay_networks
        )

    @classmethod
    def from_config(cls, config: InboundConfig) -> RecipientPolicy:
        return cls(config.accepted_domains, config.relay_networks)

    def is_relay_client(self, client_ip: str) -> bool:
        return self._relay_client(client_ip)

    def _in_relay_networks(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip in network for network in self._networks)

    def is_accepted(self, domain: str) -> bool:
        return _normal_host(domain) in self._accepted

    def check(self, recipient: str, client_ip: str, *, authenticated: bool = False) -> str | None:
        """None when the recipient is acceptable from this client, else the reply to send.

        A client that authenticated (SMTP AUTH, only ever under TLS) may relay like one in
        the relay networks (RFC 6409 §4.3).
        """
        domains = routing_domains(recipient)
        if domains is None:
            return replies.BAD_ADDRESS
        if authenticated or self.is_relay_client(client_ip) or domains <= self._accepted:
            return None
        return replies.RELAY_DENIED

    @staticmethod
    def check_sender(address: str) -> str | None:
        if address in NULL_PATHS:
            return None  # the null reverse-path: bounces and other notifications (§4.5.5)
        return None if parse_mailbox(address) is not None else replies.BAD_SENDER


def _header_lines(data: bytes, limit: int | None = None) -> Iterator[bytes]:
    """Lines (without CRLF) up to the empty line that ends the header section, within the
    first `limit` bytes; HeaderSectionTooLarge if the section goes on past them."""
    pos = 0
    while (end := data.find(b"\r\n", pos)) > pos:
        if limit is not None and end > limit:
            raise HeaderSectionTooLarge
        yield data[pos:end]
        pos = end + 2


class HeaderSectionTooLarge(ValueError):
    """The header section runs past MAX_HEADER_BYTES."""


def header_fields(data: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(lowercased name, unfolded value) of each header field (RFC 5322 §2.2, §2.2.3).

    The section also ends at the first line that is neither a field nor a continuation, so a
    message without headers is not searched through its body.
    """
    name: bytes | None = None
    value: list[bytes] = []
    for line in _header_lines(data, limit):
        if name is not None and line[:1] in (b" ", b"\t"):
            value.append(line)
            continue
        if name is not None:
            yield name, b"".join(value)
        match = _FIELD.fullmatch(line)
        if match is None:
            return
        name, value = match[1].lower(), [match[2]]
    if name is not None:
        yield name, b"".join(value)


class HeaderSection:
    """A message's header section read once: its trace fields counted and the first value of
    each field kept, for the two to four questions the accept path asks of every message.
    HeaderSectionTooLarge past MAX_HEADER_BYTES."""

    __slots__ = ("_first", "received")

    def __init__(self, data: bytes) -> None:
        self.received = 0
        self._first: dict[bytes, bytes] = {}
        for name, value in header_fields(data, MAX_HEADER_BYTES):
            if name == b"received":
                self.received += 1
            self._first.setdefault(name, value)

    def value(self, name: bytes) -> str | None:
        """The first field of that (lower-case) name, unfolded; None when absent or empty."""
        raw = self._first.get(name)
        return None if raw is None else " ".join(raw.decode("ascii", "replace").split()) or None


def has_bare_line_ending(data: bytes) -> bool:
    """True when a CR is not followed by LF or an LF is not preceded by CR.

    Each CRLF holds one CR and one LF, so the three counts agree exactly when every CR and
    every LF belongs to a CRLF; no copy of a message that may be 25 MB.
    """
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def sanitize_helo(helo: str | None) -> str:
    """The client's HELO goes into a header: one short token of domain/literal characters."""
    return _HELO_UNSAFE.sub("", helo or "")[:MAX_HELO] or "unknown"


def _tcp_info(peer_ip: str) -> str:
    """RFC 5321 §4.4 TCP-info is an address literal: IPv6 ones carry the "IPv6:" tag (§4.1.3)."""
    return f"[IPv6:{peer_ip}]" if ":" in peer_ip else f"[{peer_ip}]"


def _trace_date(when: datetime) -> str:
    # email.utils.format_datetime costs 9 us; every message of a second gets the same text.
    if when.tzinfo is UTC:
        return _utc_second(int(when.timestamp()))
    return format_datetime(when)


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    by_host: str,
    qid: str,
    recipient: str | None,
    when: datetime,
    esmtp: bool = True,
    tls: str | None = None,
    authenticated: bool = False,
) -> bytes:
    """RFC 5321 §4.4 trace header, folded, CRLF-terminated.

    `for` names only a single recipient: with several it would disclose Bcc recipients to each
    other (RFC 5321 §7.2). The date is RFC 5322 §3.3 format, independent of the locale.
    `tls` describes the session's TLS (version and cipher, as Postfix writes them); the
    with-protocol says TLS and AUTH (RFC 3848: ESMTPS, ESMTPA, ESMTPSA). The user name is
    never written.
    """
    protocol = "ESMTP" if esmtp else "SMTP"  # RFC 3848 with-protocol names
    if esmtp:
        protocol += ("S" if tls else "") + ("A" if authenticated else "")
    lines = [
        f"Received: from {sanitize_helo(helo)} ({_tcp_info(peer_ip)})",
        *([f"\t({_UNPRINTABLE.sub('', tls)})"] if tls else []),
        f"\tby {by_host} (smtpfleet) with {protocol} id {qid}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{_UNPRINTABLE.sub('', recipient)}>")
    lines[-1] += f"; {_trace_date(when)}"
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")
