"""`smtpfleet check-dns`: do DNS and mail authentication match every sending path?

MX (two or more, equal priority for active-active, targets that resolve, short TTLs), SPF
(authorizes every relay's egress address: RFC 7208, with its 10-lookup limit), DKIM (each
configured selector published with the configured key: RFC 6376) and DMARC (present, policy
shown: RFC 7489). Drift here sends good mail to spam without a single error anywhere else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

MAX_SPF_LOOKUPS = 10  # RFC 7208 §4.6.4


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a check status, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class DnsExpectations:
    egress_addresses: tuple[str, ...] = ()
    dkim: tuple[tuple[str, str], ...] = ()  # (selector, base64 key or "" for "just published")
    active_active: bool = True
    max_ttl_s: int = 300


class _Lookup:
    """dnspython's resolver with every failure mapped to an empty answer and a reason."""

    def __init__(self, nameserver: str | None, port: int, timeout_s: float) -> None:
        self.resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver is not None:
            self.resolver.nameservers = [nameserver]
            self.resolver.port = port
        self.resolver.lifetime = timeout_s

    async def records(self, name: str, rdtype: str) -> tuple[list[str], int, str | None]:
        """(record texts, TTL, failure reason or None)."""
        try:
            answer = await self.resolver.resolve(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return [], 0, f"{name} does not exist"
        except dns.resolver.NoAnswer:
            return [], 0, f"no {rdtype} record at {name}"
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            return [], 0, f"{rdtype} {name}: {exc.__class__.__name__}"
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return [_text(rdata) for rdata in answer], ttl, None

    async def txt(self, name: str) -> tuple[list[str], str | None]:
        records, _, problem = await self.records(name, "TXT")
        return records, problem


def _text(rdata: object) -> str:
    strings = getattr(rdata, "strings", None)
    if strings is not None:  # TXT: the strings of one record are one value (RFC 7208 §3.3)
        return b"".join(strings).decode("utf-8", "replace")
    return rdata.to_text()  # type: ignore[attr-defined, no-any-return]


# -- MX -------------------------------------------------------------------------------------


async def _mx(domain: str, expect: DnsExpectations, dns_: _Lookup) -> list[Check]:
    records, ttl, problem = await dns_.records(domain, "MX")
    if problem:
        return [Check("mx.count", Status.FAIL, problem)]
    pairs = sorted((int(r.split()[0]), r.split()[1].rstrip(".")) for r in records)
    checks = [
        Check(
            "mx.count",
            Status.PASS if len(pairs) >= 2 else Status.FAIL,
            f"{len(pairs)} MX record(s): " + ", ".join(f"{p} {h}" for p, h in pairs),
        ),
    ]
    priorities = {p for p, _ in pairs}
    if expect.active_active:
        equal = len(priorities) == 1
        checks.append(
            Check(
                "mx.priority",
                Status.PASS if equal else Status.WARN,
                "equal priority" if equal else f"priorities differ: {sorted(priorities)}",
            )
        )
    checks.append(await _mx_targets([h for _, h in pairs], dns_))
    too_long = ttl > expect.max_ttl_s
    checks.append(
        Check(
            "mx.ttl",
            Status.WARN if too_long else Status.PASS,
            f"TTL {ttl}s" + (f" (over {expect.max_ttl_s}s slows failover)" if too_long else ""),
        )
    )
    return checks


async def _mx_targets(hosts: Sequence[str], dns_: _Lookup) -> Check:
    bad = []
    for host in hosts:
        if _is_ip(host.strip("[]")):
            bad.append(f"{host} is an IP literal")
            continue
        v4, _, _ = await dns_.records(host, "A")
        v6, _, _ = await dns_.records(host, "AAAA")
        if not v4 and not v6:
            bad.append(f"{host} has no A/AAAA")
    if bad:
        return Check("mx.targets", Status.FAIL, "; ".join(bad))
    return Check("mx.targets", Status.PASS, "every MX target resolves")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- SPF ------------------------------------------------------------------------------------


@dataclass
class _SpfWalk:
    lookups: int = 0
    unevaluated: set[str] = field(default_factory=set)


class SpfError(Exception):
    """permerror (RFC 7208 §2.6.7): the policy cannot be evaluated."""


async def _spf_record(domain: str, dns_: _Lookup) -> str:
    texts, _ = await dns_.txt(domain)
    records = [t for t in texts if t.lower().split(" ")[0] == "v=spf1"]
    if not records:
        raise SpfError(f"no SPF record at {domain}")
    if len(records) > 1:
        raise SpfError(f"{len(records)} SPF records at {domain} (RFC 7208 §4.5: permerror)")
    return records[0]


async def _spf_allows(ip: str, domain: str, dns_: _Lookup, walk: _SpfWalk) -> bool | None:
    """True pass, False fail/softfail, None neutral/no match."""
    record = await _spf_record(domain, dns_)
    redirect = None
    for term in record.split()[1:]:
        if term.lower().startswith("redirect="):
            redirect = term.split("=", 1)[1]
            continue
        qualifier, mechanism = (term[0], term[1:]) if term[0] in "+-~?" else ("+", term)
        if await _matches(ip, mechanism, domain, dns_, walk):
            return qualifier == "+" if qualifier in "+-~" else None
    if redirect is not None:
        _count(walk)
        return await _spf_allows(ip, redirect, dns_, walk)
    return None


def _count(walk: _SpfWalk) -> None:
    walk.lookups += 1
    if walk.lookups > MAX_SPF_LOOKUPS:
        raise SpfError(f"more than {MAX_SPF_LOOKUPS} DNS lookups (RFC 7208 §4.6.4: permerror)")


async def _matches(ip: str, mechanism: str, domain: str, dns_: _Lookup, walk: _SpfWalk) -> bool:
    name, _, value = mechanism.partition(":")
    name = name.lower()
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        return _in_network(ip, value)
    if name == "include":
        _count(walk)
        return await _spf_allows(ip, value, dns_, walk) is True
    if name in ("a", "mx"):
        _count(walk)
        host, _, prefix = (value or domain).partition("/")
        addresses = await _addresses_of(name, host, dns_)
        if not prefix:
            return ip in addresses
        return any(_in_network(ip, f"{address}/{prefix}") for address in addresses)
    walk.unevaluated.add(name)  # exists, ptr, macros: not evaluated here
    return False


def _in_network(ip: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


async def _addresses_of(kind: str, host: str, dns_: _Lookup) -> set[str]:
    hosts = [host]
    if kind == "mx":
        records, _, _ = await dns_.records(host, "MX")
        hosts = [r.split()[1].rstrip(".") for r in records]
    found: set[str] = set()
    for name in hosts:
        for rdtype in ("A", "AAAA"):
            found.update((await dns_.records(name, rdtype))[0])
    return found


async def _spf(domain: str, expect: DnsExpectations, dns_: _Lookup) -> list[Check]:
    refused, walk = [], _SpfWalk()
    try:
        await _spf_record(domain, dns_)
        for ip in expect.egress_addresses:
            walk.lookups = 0
            if await _spf_allows(ip, domain, dns_, walk) is not True:
                refused.append(ip)
    except SpfError as exc:
        return [Check("spf", Status.FAIL, str(exc))]
    if refused:
        return [Check("spf", Status.FAIL, "not authorized: " + ", ".join(refused))]
    if walk.unevaluated:
        return [Check("spf", Status.WARN, "not evaluated: " + ", ".join(sorted(walk.unevaluated)))]
    count = len(expect.egress_addresses)
    return [Check("spf", Status.PASS, f"authorizes all {count} egress address(es)")]


# -- DKIM and DMARC -------------------------------------------------------------------------


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(value.split())
    return tags


async def _dkim(domain: str, selector: str, key: str, dns_: _Lookup) -> Check:
    name = f"{selector}._domainkey.{domain}"
    texts, problem = await dns_.txt(name)
    records = [_tags(t) for t in texts if "p=" in t]
    if not records:
        reason = f" ({problem})" if problem else ""
        return Check(f"dkim:{selector}", Status.FAIL, f"no DKIM key at {name}{reason}")
    tags = records[0]
    if tags.get("v", "DKIM1") != "DKIM1":
        return Check(f"dkim:{selector}", Status.FAIL, f"v={tags['v']} is not DKIM1")
    if not tags.get("p"):
        return Check(f"dkim:{selector}", Status.FAIL, "empty p=: the key is revoked (RFC 6376)")
    if key and tags["p"] != "".join(key.split()):
        return Check(f"dkim:{selector}", Status.FAIL, "key mismatch: DNS differs from the config")
    return Check(f"dkim:{selector}", Status.PASS, f"published at {name}")


async def _dmarc(domain: str, dns_: _Lookup) -> Check:
    texts, problem = await dns_.txt(f"_dmarc.{domain}")
    records = [t for t in texts if t.replace(" ", "").lower().startswith("v=dmarc1")]
    if not records:
        reason = f" ({problem})" if problem else ""
        return Check("dmarc", Status.FAIL, f"no DMARC record at _dmarc.{domain}{reason}")
    tags = _tags(records[0])
    policy = tags.get("p", "?").lower()
    shown = f"p={policy}" + (f" pct={tags['pct']}" if "pct" in tags else "")
    if policy == "none":
        return Check("dmarc", Status.WARN, f"{shown}: monitoring only, nothing is enforced")
    return Check("dmarc", Status.PASS if policy in ("quarantine", "reject") else Status.FAIL, shown)


# -- the whole check ------------------------------------------------------------------------


async def check_domain(
    domain: str,
    expectations: DnsExpectations,
    *,
    nameserver: str | None = None,
    port: int = 53,
    timeout_s: float = 3.0,
) -> list[Check]:
    dns_ = _Lookup(nameserver, port, timeout_s)
    domain = domain.rstrip(".").lower()
    checks = await _mx(domain, expectations, dns_)
    checks += await _spf(domain, expectations, dns_)
    for selector, key in expectations.dkim:
        checks.append(await _dkim(domain, selector, key, dns_))
    checks.append(await _dmarc(domain, dns_))
    return checks


def render_table(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status.value.upper():4}  {c.name:{width}}  {c.detail}" for c in checks)


def exit_code(checks: Sequence[Check]) -> int:
    statuses = {c.status for c in checks}
    return 2 if Status.FAIL in statuses else 1 if Status.WARN in statuses else 0
