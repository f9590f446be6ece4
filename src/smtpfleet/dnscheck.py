"""`smtpfleet check-dns`: do DNS and mail authentication match every sending path?

MX (two or more, equal priority for active-active, targets that resolve, short TTLs), SPF
(authorizes every relay's egress address: RFC 7208, with its 10-lookup limit), DKIM (each
configured selector published with the configured key: RFC 6376) and DMARC (present, policy
shown: RFC 7489). Drift here sends good mail to spam without a single error anywhere else.

Every DNS failure (NXDOMAIN, no data, timeout, SERVFAIL, a malformed name) becomes a failing
`Check` with the reason in its detail, never an exception.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.rdata
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.resolver

from smtpfleet.inbound.dkim import same_public_key

MAX_SPF_LOOKUPS = 10  # RFC 7208 §4.6.4: include, a, mx, ptr, exists and redirect count
MAX_SPF_VOID_LOOKUPS = 2  # RFC 7208 §4.6.4: lookups answered NXDOMAIN or with no records
MAX_SPF_MX_NAMES = 10  # RFC 7208 §4.6.4: an mx mechanism looks up at most 10 exchanges


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


# -- DNS lookups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    rdatas: tuple[dns.rdata.Rdata, ...] = ()
    ttl: int = 0
    problem: str | None = None  # why there are no records
    void: bool = False  # NXDOMAIN or no data: an answer, not an error (RFC 7208 §4.6.4)

    @property
    def texts(self) -> list[str]:
        # The strings of one TXT record are one value (RFC 7208 §3.3, RFC 6376 §3.6.2.2).
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in self.rdatas
            if isinstance(r, dns.rdtypes.ANY.TXT.TXT)
        ]

    @property
    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(r.to_text()) for r in self.rdatas]


class _Lookup:
    """dnspython's resolver, every failure mapped to an empty answer with a reason.

    Answers are remembered for the run: SPF is walked once per egress address and would
    otherwise ask the same questions again. RFC 7208's lookup limits are counted by the
    walk, not here, so the cache does not change what is counted.
    """

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver
        self._cache: dict[tuple[str, str], _Answer] = {}

    async def query(self, name: str, rdtype: str) -> _Answer:
        key = (name.rstrip(".").lower(), rdtype)
        if key not in self._cache:
            self._cache[key] = await self._query(key[0], rdtype)
        return self._cache[key]

    async def _query(self, name: str, rdtype: str) -> _Answer:
        try:
            answer = await self._resolver.resolve(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return _Answer(problem=f"{name} does not exist", void=True)
        except dns.resolver.NoAnswer:
            return _Answer(problem=f"no {rdtype} record at {name}", void=True)
        except dns.exception.Timeout:
            timeout = self._resolver.lifetime
            return _Answer(problem=f"{rdtype} {name}: no answer within {timeout:g}s (timeout)")
        except dns.exception.DNSException as exc:  # SERVFAIL, REFUSED, malformed name...
            return _Answer(problem=f"{rdtype} {name}: {exc}")
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return _Answer(rdatas=tuple(answer), ttl=ttl)


def _resolver(nameserver: str | None, port: int, timeout_s: float) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver]
        resolver.port = port
    resolver.lifetime = timeout_s
    resolver.timeout = min(resolver.timeout, timeout_s)
    return resolver


# -- MX -------------------------------------------------------------------------------------


async def _mx(domain: str, expect: DnsExpectations, dns_: _Lookup) -> list[Check]:
    answer = await dns_.query(domain, "MX")
    if answer.problem:
        return [Check("mx.count", Status.FAIL, answer.problem)]
    pairs = sorted(_mx_pairs(answer))
    if any(host == "" for _, host in pairs):
        return [Check("mx.count", Status.FAIL, "null MX (RFC 7505): the domain accepts no mail")]
    checks = [_mx_count(pairs)]
    if expect.active_active:
        checks.append(_mx_priority(pairs))
    checks.append(await _mx_targets([host for _, host in pairs], dns_))
    checks.append(_mx_ttl(answer.ttl, expect.max_ttl_s))
    return checks


def _mx_pairs(answer: _Answer) -> list[tuple[int, str]]:
    return [
        (r.preference, r.exchange.to_text().rstrip(".").lower())
        for r in answer.rdatas
        if isinstance(r, dns.rdtypes.ANY.MX.MX)
    ]


def _mx_count(pairs: Sequence[tuple[int, str]]) -> Check:
    listed = ", ".join(f"{p} {h}" for p, h in pairs)
    status = Status.PASS if len(pairs) >= 2 else Status.FAIL
    note = "" if len(pairs) >= 2 else " (two or more needed: one MX is a single point of failure)"
    return Check("mx.count", status, f"{len(pairs)} MX record(s): {listed}{note}")


def _mx_priority(pairs: Sequence[tuple[int, str]]) -> Check:
    # Senders try the lowest preference first (RFC 5321 §5.1): unequal preferences make the
    # other nodes standby, not active-active.
    priorities = sorted({p for p, _ in pairs})
    if len(priorities) <= 1:
        return Check("mx.priority", Status.PASS, "equal priority")
    return Check("mx.priority", Status.WARN, f"priorities differ: {priorities}")


async def _mx_targets(hosts: Sequence[str], dns_: _Lookup) -> Check:
    problems = await asyncio.gather(*(_mx_target_problem(host, dns_) for host in hosts))
    bad = [p for p in problems if p is not None]
    if bad:
        return Check("mx.targets", Status.FAIL, "; ".join(bad))
    return Check("mx.targets", Status.PASS, "every MX target resolves to A/AAAA")


async def _mx_target_problem(host: str, dns_: _Lookup) -> str | None:
    # An MX names a host, never an address (RFC 5321 §5.1, RFC 7505 §3): senders look an
    # "IP literal" exchange up as a name, which fails.
    if is_ip(host.strip("[]")):
        return f"{host} is an IP literal, not a host name"
    v4, v6 = await asyncio.gather(dns_.query(host, "A"), dns_.query(host, "AAAA"))
    if v4.rdatas or v6.rdatas:
        return None
    return f"{host} has no A/AAAA ({v4.problem})"


def _mx_ttl(ttl: int, max_ttl_s: int) -> Check:
    # Through a caching resolver this is the remaining TTL, at most the published one.
    if ttl > max_ttl_s:
        return Check("mx.ttl", Status.WARN, f"TTL {ttl}s is over {max_ttl_s}s: slows failover")
    return Check("mx.ttl", Status.PASS, f"TTL {ttl}s")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- SPF (RFC 7208) -------------------------------------------------------------------------

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
# domain-spec, then an optional dual-cidr-length: "host/24//64" (RFC 7208 §5.6).
_SPEC_CIDR = re.compile(r"^(?P<spec>[^/]*)(?:/(?P<v4>\d{1,2}))?(?://(?P<v6>\d{1,3}))?$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*")


class SpfError(Exception):
    """permerror or temperror (RFC 7208 §2.6.6-7): the policy cannot be evaluated."""


@dataclass
class _SpfWalk:
    """One evaluation of check_host() for one address (RFC 7208 §4)."""

    ip: _IP
    lookups: int = 0
    void_lookups: int = 0
    unevaluated: list[str] = field(default_factory=list)  # seen before the result was known

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_SPF_LOOKUPS:
            raise SpfError(f"too many lookups: over {MAX_SPF_LOOKUPS} (RFC 7208 §4.6.4)")

    def answered(self, answer: _Answer) -> None:
        if answer.void:
            self.void_lookups += 1
            if self.void_lookups > MAX_SPF_VOID_LOOKUPS:
                raise SpfError(
                    f"too many void lookups: over {MAX_SPF_VOID_LOOKUPS} (RFC 7208 §4.6.4), "
                    f"last: {answer.problem}"
                )
        elif answer.problem:
            raise SpfError(f"temperror: {answer.problem}")


async def _spf_record(domain: str, dns_: _Lookup) -> str:
    answer = await dns_.query(domain, "TXT")
    if answer.problem and not answer.void:
        raise SpfError(f"temperror: {answer.problem}")
    # "v=spf1" then a space or the end (RFC 7208 §4.5); other TXT records are ignored.
    records = [t for t in answer.texts if re.match(r"(?i)v=spf1( |$)", t)]
    if not records:
        raise SpfError(f"no SPF record at {domain}")
    if len(records) > 1:
        raise SpfError(f"{len(records)} SPF records at {domain} (RFC 7208 §4.5: permerror)")
    return records[0]


async def _check_host(domain: str, dns_: _Lookup, walk: _SpfWalk) -> str:
    """The SPF result for walk.ip: pass, fail, softfail or neutral; raises SpfError."""
    terms = (await _spf_record(domain, dns_)).split()[1:]
    redirect: str | None = None
    for term in terms:
        modifier = _modifier(term)
        if modifier is not None:
            name, value = modifier
            if name == "redirect":
                if redirect is not None:  # RFC 7208 §6: at most once
                    raise SpfError(f"two redirect= modifiers at {domain}")
                redirect = value
            continue  # exp= and unknown modifiers are ignored (RFC 7208 §6)
        qualifier = term[0] if term[0] in _QUALIFIERS else "+"
        mechanism = term[1:] if term[0] in _QUALIFIERS else term
        if await _matches(mechanism, domain, dns_, walk):
            return _QUALIFIERS[qualifier]
    # redirect= applies only when no mechanism matched, so never after "all" (RFC 7208 §6.1).
    if redirect is None:
        return "neutral"  # RFC 7208 §4.7
    walk.count()
    if "%" in redirect:
        walk.unevaluated.append(f"redirect={redirect}")
        return "neutral"
    return await _check_host(redirect, dns_, walk)


def _modifier(term: str) -> tuple[str, str] | None:
    # A modifier is name=value; mechanisms never have "=" before ":" or "/" (RFC 7208 §4.6.1).
    name = _NAME.match(term)
    if name and term[name.end() : name.end() + 1] == "=":
        return name.group().lower(), term[name.end() + 1 :]
    return None


async def _matches(mechanism: str, domain: str, dns_: _Lookup, walk: _SpfWalk) -> bool:
    name_match = re.match(r"^[A-Za-z0-9]+", mechanism)
    name = name_match.group().lower() if name_match else ""
    rest = mechanism[len(name) :]
    if name == "all" and not rest:
        return True
    if name in ("ip4", "ip6") and rest.startswith(":"):
        return _in_ip_mechanism(walk.ip, name, rest[1:])
    if name in ("exists", "ptr"):
        walk.count()  # they cost a lookup even though they are not evaluated here
        walk.unevaluated.append(mechanism)
        return False
    if name not in ("a", "mx", "include"):
        raise SpfError(f"unknown mechanism {mechanism!r} (RFC 7208 §5: permerror)")
    walk.count()
    if "%" in rest:  # macros (RFC 7208 §7) are not expanded here
        walk.unevaluated.append(mechanism)
        return False
    if name == "include":
        return await _include(rest, mechanism, dns_, walk)
    return await _a_or_mx(name, rest, mechanism, domain, dns_, walk)


def _in_ip_mechanism(ip: _IP, name: str, value: str) -> bool:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise SpfError(f"invalid {name}:{value} (RFC 7208 §5.6: permerror)") from None
    if network.version != (4 if name == "ip4" else 6):
        raise SpfError(f"{name}:{value} is not an IPv{name[-1]} network (RFC 7208 §5.6)")
    return ip.version == network.version and ip in network


async def _include(rest: str, mechanism: str, dns_: _Lookup, walk: _SpfWalk) -> bool:
    if not rest.startswith(":") or len(rest) < 2:
        raise SpfError(f"{mechanism!r} needs a domain (RFC 7208 §5.2)")
    # Only an included "pass" matches; fail, softfail and neutral just don't match, and an
    # included domain without SPF is a permerror (RFC 7208 §5.2), raised by _spf_record.
    return await _check_host(rest[1:], dns_, walk) == "pass"


async def _a_or_mx(
    name: str, rest: str, mechanism: str, domain: str, dns_: _Lookup, walk: _SpfWalk
) -> bool:
    parsed = _SPEC_CIDR.match(rest[1:] if rest.startswith(":") else rest)
    if parsed is None or (rest.startswith(":") and not parsed["spec"]):
        raise SpfError(f"invalid {mechanism!r} (RFC 7208 §5.6: permerror)")
    host = parsed["spec"] or domain
    prefix = parsed["v4"] if walk.ip.version == 4 else parsed["v6"]
    hosts = [host]
    if name == "mx":
        answer = await dns_.query(host, "MX")
        walk.answered(answer)
        hosts = [h for _, h in _mx_pairs(answer)]
        if len(hosts) > MAX_SPF_MX_NAMES:
            raise SpfError(f"{mechanism}: {len(hosts)} MX names, over {MAX_SPF_MX_NAMES}")
    for target in hosts:
        # Only the record type of the sender's family is asked for (RFC 7208 §5.3).
        answer = await dns_.query(target, "A" if walk.ip.version == 4 else "AAAA")
        if name == "a":
            walk.answered(answer)
        bits = int(prefix) if prefix else walk.ip.max_prefixlen
        for address in answer.addresses:
            if walk.ip in ipaddress.ip_network(f"{address}/{bits}", strict=False):
                return True
    return False


async def _spf(domain: str, expect: DnsExpectations, dns_: _Lookup) -> Check:
    try:
        await _spf_record(domain, dns_)
        walks = [await _walk(ip, domain, dns_) for ip in expect.egress_addresses]
    except SpfError as exc:
        return Check("spf", Status.FAIL, str(exc))
    unevaluated = sorted({term for walk, _ in walks for term in walk.unevaluated})
    skipped = f"not evaluated: {', '.join(unevaluated)}" if unevaluated else ""
    # An address the evaluated terms refuse may still be let in by an unevaluated one.
    refused = [f"{w.ip} ({result})" for w, result in walks if result != "pass"]
    if refused and not unevaluated:
        return Check("spf", Status.FAIL, "not authorized: " + ", ".join(refused))
    if refused:
        return Check("spf", Status.WARN, f"not shown authorized: {', '.join(refused)}; {skipped}")
    if unevaluated:
        return Check("spf", Status.WARN, f"authorizes every egress address; {skipped}")
    if not walks:
        return Check("spf", Status.WARN, "SPF published; no egress addresses configured to check")
    return Check("spf", Status.PASS, f"authorizes all {len(walks)} egress address(es)")


async def _walk(ip: str, domain: str, dns_: _Lookup) -> tuple[_SpfWalk, str]:
    try:
        walk = _SpfWalk(ipaddress.ip_address(ip))
    except ValueError:
        raise SpfError(f"egress address {ip!r} is not an IP address") from None
    try:
        return walk, await _check_host(domain, dns_, walk)
    except SpfError as exc:
        raise SpfError(f"{exc} (evaluating {ip})") from None


# -- DKIM (RFC 6376) ------------------------------------------------------------------------


def _tags(record: str) -> dict[str, str]:
    """tag=value; list, whitespace removed from values (RFC 6376 §3.2, RFC 7489 §6.4)."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(value.split())
    return tags


def _normalize_key(key: str) -> str:
    """A configured key: base64 as in p=, or a PEM public key (armor lines dropped)."""
    lines = [line for line in key.strip().splitlines() if not line.startswith("-----")]
    return "".join("".join(lines).split())


async def _dkim(domain: str, selector: str, key: str, dns_: _Lookup) -> Check:
    name = f"dkim:{selector}"
    where = f"{selector}._domainkey.{domain}"
    answer = await dns_.query(where, "TXT")
    records = [_tags(t) for t in answer.texts if "p" in _tags(t)]
    if not records:
        reason = f" ({answer.problem})" if answer.problem else ""
        return Check(name, Status.FAIL, f"no DKIM key record at {where}{reason}")
    check = _dkim_record(name, where, records[0], _normalize_key(key))
    if len(records) > 1 and check.status is Status.PASS:
        # Verifiers may pick any of several key records (RFC 6376 §3.6.2.2).
        return Check(name, Status.WARN, f"{len(records)} key records at {where}")
    return check


def _dkim_record(name: str, where: str, tags: dict[str, str], key: str) -> Check:
    published = tags["p"]
    if tags.get("v", "DKIM1") != "DKIM1":  # RFC 6376 §3.6.1
        return Check(name, Status.FAIL, f"v={tags['v']} at {where} is not DKIM1")
    if not published:
        return Check(name, Status.FAIL, f"empty p= at {where}: key revoked (RFC 6376 §3.6.1)")
    try:
        base64.b64decode(published, validate=True)
    except (binascii.Error, ValueError):
        return Check(name, Status.FAIL, f"p= at {where} is not base64")
    # Key material, not text: p= may be a SubjectPublicKeyInfo or a bare RSAPublicKey.
    if key and not same_public_key(published, key):
        return Check(
            name,
            Status.FAIL,
            f"key mismatch at {where}: DNS p={_short(published)}, config {_short(key)}",
        )
    if "y" in tags.get("t", "").split(":"):  # testing mode (RFC 6376 §3.6.1)
        return Check(name, Status.WARN, f"t=y at {where}: verifiers may ignore signatures")
    return Check(name, Status.PASS, f"published at {where}" + (" (key matches)" if key else ""))


def _short(key: str) -> str:
    return key if len(key) <= 20 else f"{key[:8]}…{key[-8:]}"


# -- DMARC (RFC 7489) -----------------------------------------------------------------------


async def _dmarc(domain: str, dns_: _Lookup) -> Check:
    where = f"_dmarc.{domain}"
    answer = await dns_.query(where, "TXT")
    # v=DMARC1 must come first and match exactly (RFC 7489 §6.3, §6.4).
    records = [t for t in answer.texts if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t)]
    if not records:
        reason = f" ({answer.problem})" if answer.problem else ""
        return Check("dmarc", Status.FAIL, f"no DMARC record at {where}{reason}")
    if len(records) > 1:  # receivers then apply no policy at all (RFC 7489 §6.6.3)
        return Check("dmarc", Status.FAIL, f"{len(records)} DMARC records at {where}")
    tags = _tags(records[0])
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return Check("dmarc", Status.FAIL, f"no valid p= in the record at {where}")
    shown = f"p={policy}" + (f" pct={tags['pct']}" if "pct" in tags else "")
    if policy == "none":
        return Check("dmarc", Status.WARN, f"{shown}: monitoring only, nothing is enforced")
    return Check("dmarc", Status.PASS, shown)


# -- the whole check ------------------------------------------------------------------------


async def check_domain(
    domain: str,
    expectations: DnsExpectations,
    *,
    nameserver: str | None = None,
    port: int = 53,
    timeout_s: float = 3.0,
) -> list[Check]:
    """Every check of `domain`; `nameserver` None asks the system's resolvers."""
    try:
        resolver = _resolver(nameserver, port, timeout_s)
    except (dns.exception.DNSException, ValueError) as exc:
        return [Check("dns", Status.FAIL, f"cannot use nameserver {nameserver}: {exc}")]
    dns_ = _Lookup(resolver)
    domain = domain.rstrip(".").lower()
    # Independent checks run together: a dead server costs one timeout, not one per check.
    mx, spf, dmarc, dkim = await asyncio.gather(
        _mx(domain, expectations, dns_),
        _spf(domain, expectations, dns_),
        _dmarc(domain, dns_),
        asyncio.gather(*(_dkim(domain, s, key, dns_) for s, key in expectations.dkim)),
    )
    return [*mx, spf, *dkim, dmarc]


def render_table(checks: Sequence[Check]) -> str:
    """An aligned table for humans, a summary line last."""
    if not checks:
        return "no checks"
    width = max(len("CHECK"), *(len(c.name) for c in checks))
    lines = [f"{'STATUS':6}  {'CHECK':{width}}  DETAIL"]
    lines += [f"{c.status.value.upper():6}  {c.name:{width}}  {c.detail}" for c in checks]
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    lines.append(", ".join(f"{n} {s.value}" for s, n in counts.items()))
    return "\n".join(lines)


def exit_code(checks: Iterable[Check]) -> int:
    """0 all pass, 1 a warning and no failure, 2 any failure."""
    statuses = {c.status for c in checks}
    return 2 if Status.FAIL in statuses else 1 if Status.WARN in statuses else 0
