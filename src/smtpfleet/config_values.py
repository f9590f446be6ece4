"""The syntax of values the config names: domains, hosts, networks, addresses, Redis URLs.

Pure functions for the validators of config.py: each returns the value (or its normal form)
or raises ValueError saying what is wrong. They exist because a value that passed as "any
string" failed later and far away: a CR LF in `node.hostname` went into the SMTP banner, a
`host:port` in a relay's host never resolved, `10.0.0.1/8` was silently widened to a network
nobody wrote, `redis://h/abc` silently used database 0.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final
from urllib.parse import parse_qs, urlparse

_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_LABEL_RE: Final = re.compile(_LABEL)
# RFC 5321 §4.1.2 Domain: sub-domains of letters, digits and inner hyphens; 63 per label
# (RFC 1035 §2.3.4), 255 in all (RFC 5321 §4.5.3.1.2).
_SMTP_DOMAIN_RE: Final = re.compile(
    r"(?=.{1,255}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# A host to connect to: DNS resolves more than RFC 5321 allows (a compose service `relay_a`),
# so `_` is accepted too, and a final dot (an absolute name).
_HOST_RE: Final = re.compile(
    r"(?=.{1,254}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
# RFC 5322 §3.2.3 atext, for a dot-atom local part; quoted local parts are not needed here.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART_RE: Final = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# `addr-spec` or `display-name <addr-spec>`; the name is a quoted string or a phrase without
# RFC 5322 specials (which would make it another address or a group).
_MAILBOX_RE: Final = re.compile(
    r'(?:(?P<name>"[^"\\]*"|[^"(),:;<>@\[\\\]]*?)\s*<(?P<angle>[^<>]*)>|(?P<bare>[^<>\s]+))'
)
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def domain_name(value: str, min_labels: int = 2) -> str:
    """A mail domain as DNS and SMTP spell it: lowercase, no trailing dot, `min_labels` labels
    or more of letters, digits and hyphens (a U-label becomes its A-label). ValueError
    otherwise."""
    domain = value.strip().lower().rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:  # an empty or overlong label
        raise ValueError(f"{value!r} is not a domain name") from None
    labels = domain.split(".")
    if len(labels) < min_labels or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is not a domain name")
    return domain


def domain_pattern(value: str) -> str:
    """A domain of a routing rule or traffic class: a name, or `*.name` for its subdomains, in
    the form mail carries it (A-labels: SMTPUTF8 is not offered, so an internationalized
    domain arrives as xn--...). Kept as written, `bücher.example` never matched its mail, and
    a rule's mail went to relays the rule forbids."""
    text = value.strip()
    if text.startswith("*."):
        return "*." + domain_name(text[2:], min_labels=1)
    return domain_name(text, min_labels=1)


def valid_literal(literal: str) -> bool:
    """RFC 5321 §4.1.3, brackets included: a dotted quad, or "IPv6:" and an IPv6 address; no
    general literals. Here, below the config, so the config's names and the inbound
    grammar (inbound/syntax.py) judge a literal the same way."""
    text = literal[1:-1]
    try:
        if text[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(text[5:])
        else:
            ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def smtp_domain(value: str) -> str:
    """A name we say in SMTP (the 220 banner, EHLO, Received's `by`): an RFC 5321 §4.1.2
    Domain or address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`). It is written into
    commands and replies as it is, so a space, CR, LF or any control character would end the
    line early or inject another one."""
    if value.startswith("[") and value.endswith("]"):
        if not valid_literal(value):
            raise ValueError(
                f"{value!r} is not an address literal ([192.0.2.1] or [IPv6:2001:db8::1])"
            )
        return value
    if not _SMTP_DOMAIN_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a domain name (letters, digits, hyphens and dots; no spaces or "
            "control characters) nor an address literal such as [192.0.2.1]"
        )
    return value


def relay_host(value: str) -> str:
    """The host of a relay: a DNS name or an IP address (IPv6 without brackets); the port
    has its own key."""
    if not value:
        raise ValueError("empty: the relay's DNS name or IP address is required")
    if ":" in value or value.startswith("["):
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a host: give the port as `port`, and an IPv6 address "
                "without brackets (2001:db8::25)"
            ) from None
        return value
    if not _HOST_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


def network(value: str) -> str:
    """A CIDR network. One with host bits set (`10.0.0.1/8`) is refused, naming the network
    it would stand for: Postfix warns and widens it; a typo must not open a relay."""
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            meant = ipaddress.ip_interface(value)  # parses only when host bits were the fault
        except ValueError:
            raise exc from None
        raise ValueError(
            f"{value!r} has host bits set: write {meant.network} for that network, or "
            f"{meant.ip}/{meant.max_prefixlen} for the one host"
        ) from None
    return value


def mailbox(value: str) -> str:
    """One From: mailbox, `local@domain` or `Name <local@domain>` (RFC 5322 §3.4), with the
    domain in its A-label form: an internationalized domain would otherwise be written as an
    RFC 2047 encoded word inside the addr-spec, which §5(3) forbids. A non-ASCII display name
    is fine (it is encoded as a phrase); a non-ASCII local part has no ASCII form."""
    if _CONTROL_RE.search(value):
        raise ValueError("a mail address has no control characters (CR, LF, tab, ...)")
    text = value.strip()
    match = _MAILBOX_RE.fullmatch(text)
    if match is None:
        raise _not_a_mailbox(value)
    group = "angle" if match.group("angle") is not None else "bare"
    local, at, domain = match.group(group).rpartition("@")
    if not local.isascii():
        raise ValueError(
            f"{value!r}: the local part must be ASCII (a non-ASCII one cannot be written in "
            "the From: header of a DSN)"
        )
    try:
        if not (at and _LOCAL_PART_RE.fullmatch(local)):
            raise ValueError
        a_label = domain_name(domain, min_labels=1)
    except ValueError:
        raise _not_a_mailbox(value) from None
    return f"{text[: match.start(group)]}{local}@{a_label}{text[match.end(group) :]}"


def _not_a_mailbox(value: str) -> ValueError:
    return ValueError(
        f"{value!r} is not a mail address (local@example.com or Name <local@example.com>)"
    )


def redis_database(url: str) -> None:
    """The database of a Redis URL is a number: redis-py reads `redis://h/abc` as database 0
    and `redis://h/1/2` as 12, silently; `?db=` (every scheme) must be a number too."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query).get("db", [])
    if any(not (db.isascii() and db.isdigit()) for db in query):
        raise ValueError("?db= must be a database number")
    if parsed.scheme == "unix":
        return  # the path is the socket's
    path = parsed.path.removeprefix("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f"the path of a Redis URL is a database number (/0), not /{path}")
