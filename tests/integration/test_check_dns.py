"""`check-dns` against a real DNS server on loopback (UDP and TCP) serving good and broken zones."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from smtpfleet.dnscheck import (
    Check,
    DnsExpectations,
    Status,
    check_domain,
    exit_code,
    render_table,
)
from smtpfleet.testing import run_cli
from smtpfleet.testing.dns_server import DnsServer

pytestmark = pytest.mark.timeout(30)

KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAtest"
GOOD: dict[str, dict[str, tuple[int, list[str]]]] = {
    "good.test": {
        "MX": (300, ["10 mx1.good.test.", "10 mx2.good.test."]),
        "TXT": (300, ['"v=spf1 ip4:192.0.2.0/24 include:_spf.other.test -all"']),
    },
    "mx1.good.test": {"A": (300, ["192.0.2.10"])},
    "mx2.good.test": {"AAAA": (300, ["2001:db8::10"])},
    "_spf.other.test": {"TXT": (300, ['"v=spf1 ip4:198.51.100.7 -all"'])},
    "s1._domainkey.good.test": {"TXT": (300, [f'"v=DKIM1; k=rsa; p={KEY[:20]}" "{KEY[20:]}"'])},
    "_dmarc.good.test": {"TXT": (300, ['"v=DMARC1; p=reject; pct=100"'])},
}
EXPECT = DnsExpectations(
    egress_addresses=("192.0.2.25", "198.51.100.7"), dkim=(("s1", KEY),), max_ttl_s=300
)


def patched(records: dict[str, Any]) -> dict[str, Any]:
    """GOOD with names replaced (None: removed) or given extra record types."""
    zone: dict[str, Any] = copy.deepcopy(GOOD)
    for name, value in records.items():
        if value is None:
            zone.pop(name)
        else:
            zone[name] = {**zone.get(name, {}), **value}
    return zone


async def run(
    zone: dict[str, Any], expect: DnsExpectations = EXPECT
) -> dict[str, tuple[Status, str]]:
    async with DnsServer(zone) as server:
        checks = await check_domain("good.test", expect, nameserver="127.0.0.1", port=server.port)
    return {c.name: (c.status, c.detail) for c in checks}


async def test_a_good_domain_passes_everything() -> None:
    async with DnsServer(GOOD) as server:
        checks = await check_domain("good.test", EXPECT, nameserver="127.0.0.1", port=server.port)
    result = {c.name: c.status for c in checks}
    assert list(result) == [
        "mx.count",
        "mx.priority",
        "mx.targets",
        "mx.ttl",
        "spf",
        "dkim:s1",
        "dmarc",
    ]
    assert set(result.values()) == {Status.PASS}, render_table(checks)
    assert exit_code(checks) == 0
    assert "p=reject pct=100" in checks[-1].detail
    assert "key matches" in checks[-2].detail


@pytest.mark.parametrize(
    ("records", "check", "status", "detail"),
    [
        pytest.param(
            {"good.test": {"MX": (300, ["10 mx1.good.test."])}},
            "mx.count",
            Status.FAIL,
            "1 MX",
            id="one-mx",
        ),
        pytest.param(
            {"good.test": {"MX": (300, ["0 ."])}},
            "mx.count",
            Status.FAIL,
            "null MX",
            id="null-mx",
        ),
        pytest.param(
            {"good.test": {"MX": (300, ["10 mx1.good.test.", "20 mx2.good.test."])}},
            "mx.priority",
            Status.WARN,
            "priorities differ: [10, 20]",
            id="unequal-priority",
        ),
        pytest.param(
            {"good.test": {"MX": (300, ["10 mx1.good.test.", "10 mx3.good.test."])}},
            "mx.targets",
            Status.FAIL,
            "mx3.good.test has no A/AAAA",
            id="mx-target-without-address",
        ),
        pytest.param(
            {"good.test": {"MX": (300, ["10 mx1.good.test.", "10 192.0.2.1."])}},
            "mx.targets",
            Status.FAIL,
            "192.0.2.1 is an IP literal",
            id="mx-target-ip-literal",
        ),
        pytest.param(
            {"good.test": {"MX": (3600, ["10 mx1.good.test.", "10 mx2.good.test."])}},
            "mx.ttl",
            Status.WARN,
            "TTL 3600s",
            id="long-ttl",
        ),
        pytest.param(
            {"good.test": {"TXT": (300, ['"google-site-verification=x"'])}},
            "spf",
            Status.FAIL,
            "no SPF record at good.test",
            id="no-spf",
        ),
        pytest.param(
            {"good.test": {"TXT": (300, ['"v=spf1 -all"', '"v=spf1 ip4:192.0.2.0/24 -all"'])}},
            "spf",
            Status.FAIL,
            "2 SPF records",
            id="two-spf",
        ),
        pytest.param(
            {"good.test": {"TXT": (300, ['"v=spf1 ip4:192.0.2.0/24 -all"'])}},
            "spf",
            Status.FAIL,
            "not authorized: 198.51.100.7 (fail)",
            id="spf-misses-an-egress-address",
        ),
        pytest.param(
            {"_spf.other.test": {"TXT": (300, ['"v=spf1 include:good.test -all"'])}},
            "spf",
            Status.FAIL,
            "too many lookups",
            id="spf-include-loop",
        ),
        pytest.param(
            {"s1._domainkey.good.test": None},
            "dkim:s1",
            Status.FAIL,
            "no DKIM key record at s1._domainkey.good.test",
            id="dkim-missing",
        ),
        pytest.param(
            {"s1._domainkey.good.test": {"TXT": (300, ['"v=DKIM1; p=T1RIRVJLRVk="'])}},
            "dkim:s1",
            Status.FAIL,
            "key mismatch",
            id="dkim-key-mismatch",
        ),
        pytest.param(
            {"s1._domainkey.good.test": {"TXT": (300, ['"v=DKIM1; p="'])}},
            "dkim:s1",
            Status.FAIL,
            "revoked",
            id="dkim-revoked",
        ),
        pytest.param(
            {"s1._domainkey.good.test": {"TXT": (300, [f'"v=DKIM1; t=y; p={KEY}"'])}},
            "dkim:s1",
            Status.WARN,
            "t=y",
            id="dkim-testing-mode",
        ),
        pytest.param(
            {"_dmarc.good.test": None},
            "dmarc",
            Status.FAIL,
            "no DMARC record at _dmarc.good.test",
            id="dmarc-missing",
        ),
        pytest.param(
            {"_dmarc.good.test": {"TXT": (300, ['"v=DMARC1; p=none"'])}},
            "dmarc",
            Status.WARN,
            "p=none",
            id="dmarc-none",
        ),
        pytest.param(
            {"_dmarc.good.test": {"TXT": (300, ['"v=DMARC1; p=reject"', '"v=DMARC1; p=none"'])}},
            "dmarc",
            Status.FAIL,
            "2 DMARC records",
            id="dmarc-twice",
        ),
        pytest.param(
            {"_dmarc.good.test": {"TXT": (300, ['"v=DMARC1; p=quarantine; pct=25"'])}},
            "dmarc",
            Status.PASS,
            "p=quarantine pct=25",
            id="dmarc-quarantine",
        ),
    ],
)
async def test_each_kind_of_drift_is_reported(
    records: dict[str, Any], check: str, status: Status, detail: str
) -> None:
    result = await run(patched(records))
    assert result[check][0] is status, result[check]
    assert detail in result[check][1], result[check]


# SPF evaluation (RFC 7208): record at good.test, egress addresses, expected status and detail.
SPF_ZONE = {
    "relay.good.test": {"A": (300, ["192.0.2.1"]), "AAAA": (300, ["2001:db8::1"])},
    **{
        f"c{i}.good.test": {"TXT": (300, [f'"v=spf1 include:c{i + 1}.good.test -all"'])}
        for i in range(12)
    },
}


@pytest.mark.parametrize(
    ("spf", "egress", "status", "detail"),
    [
        ("v=spf1 a:relay.good.test -all", ("192.0.2.1", "2001:DB8::1"), Status.PASS, "all 2"),
        ("v=spf1 a:relay.good.test/24 -all", ("192.0.2.25",), Status.PASS, "all 1"),
        ("v=spf1 a:relay.good.test/32//64 -all", ("2001:db8::ff",), Status.PASS, "all 1"),
        ("v=spf1 a/24 -all", ("192.0.2.77",), Status.PASS, "all 1"),
        ("v=spf1 mx -all", ("192.0.2.10", "2001:db8::10"), Status.PASS, "all 2"),
        ("v=spf1 mx:good.test -all", ("192.0.2.11",), Status.FAIL, "192.0.2.11 (fail)"),
        ("v=spf1 ip6:2001:db8::/32 -all", ("2001:db8:1::5",), Status.PASS, "all 1"),
        ("v=spf1 redirect=_spf.other.test", ("198.51.100.7",), Status.PASS, "all 1"),
        ("v=spf1 redirect=_spf.other.test", ("192.0.2.25",), Status.FAIL, "192.0.2.25 (fail)"),
        ("v=spf1 ip4:192.0.2.0/24 ~all", ("198.51.100.7",), Status.FAIL, "(softfail)"),
        ("v=spf1 ?ip4:192.0.2.0/24 -all", ("192.0.2.25",), Status.FAIL, "(neutral)"),
        ("v=spf1 ip4:192.0.2.0/24", ("198.51.100.9",), Status.FAIL, "198.51.100.9 (neutral)"),
        ("v=spf1 ip4:192.0.2.0/24 exp=why.good.test -all", ("192.0.2.25",), Status.PASS, "all"),
        ("v=spf1 exists:%{i}.x.good.test -all", ("192.0.2.25",), Status.WARN, "not evaluated"),
        ("v=spf1 ptr ip4:192.0.2.0/24 -all", ("192.0.2.25",), Status.WARN, "not evaluated: ptr"),
        ("v=spf1 include:%{d}.x.test -all", ("192.0.2.25",), Status.WARN, "not evaluated"),
        ("v=spf1 include:c0.good.test -all", ("192.0.2.25",), Status.FAIL, "too many lookups"),
        (
            "v=spf1 a:n1.good.test a:n2.good.test a:n3.good.test -all",
            ("192.0.2.25",),
            Status.FAIL,
            "too many void lookups",
        ),
        ("v=spf1 include:nospf.good.test -all", ("192.0.2.25",), Status.FAIL, "no SPF record"),
        ("v=spf1 ip4:192.0.2.300 -all", ("192.0.2.25",), Status.FAIL, "invalid ip4:"),
        ("v=spf1 ip4:2001:db8::/32 -all", ("192.0.2.25",), Status.FAIL, "not an IPv4"),
        ("v=spf1 foo:bar -all", ("192.0.2.25",), Status.FAIL, "unknown mechanism"),
        ("v=spf1 ip4:192.0.2.0/24 -all", (), Status.WARN, "no egress addresses"),
        ("v=spf1 -all", ("not-an-ip",), Status.FAIL, "not an IP address"),
    ],
)
async def test_spf_evaluation(
    spf: str, egress: tuple[str, ...], status: Status, detail: str
) -> None:
    zone = patched(
        {
            **SPF_ZONE,
            "good.test": {"TXT": (300, [f'"{spf}"']), "A": (300, ["192.0.2.2"])},
            "nospf.good.test": {"TXT": (300, ['"unrelated"'])},
        }
    )
    result = await run(zone, DnsExpectations(egress_addresses=egress))
    assert result["spf"][0] is status, result["spf"]
    assert detail in result["spf"][1], result["spf"]


async def test_a_long_dkim_key_is_fetched_over_tcp_after_truncation() -> None:
    key = "A" * 736  # about a 4096-bit RSA key: over 512 bytes, so UDP comes back truncated
    chunks = " ".join(f'"{key[i : i + 255]}"' for i in range(0, len(key), 255))
    zone = patched({"s1._domainkey.good.test": {"TXT": (300, [f'"v=DKIM1; p=" {chunks}'])}})
    async with DnsServer(zone) as server:
        checks = await check_domain(
            "good.test",
            DnsExpectations(dkim=(("s1", key),)),
            nameserver="127.0.0.1",
            port=server.port,
        )
        assert server.tcp_queries >= 1
    dkim = next(c for c in checks if c.name == "dkim:s1")
    assert dkim.status is Status.PASS, dkim


async def test_a_pem_key_in_the_config_matches_the_published_base64() -> None:
    pem = f"-----BEGIN PUBLIC KEY-----\n{KEY[:30]}\n{KEY[30:]}\n-----END PUBLIC KEY-----\n"
    result = await run(GOOD, DnsExpectations(dkim=(("s1", pem),)))
    assert result["dkim:s1"][0] is Status.PASS


async def test_a_missing_domain_fails_cleanly() -> None:
    async with DnsServer({}) as server:
        checks = await check_domain(
            "nowhere.test", EXPECT, nameserver="127.0.0.1", port=server.port
        )
    assert exit_code(checks) == 2
    assert {c.status for c in checks} == {Status.FAIL}
    assert checks[0] == Check("mx.count", Status.FAIL, "nowhere.test does not exist")
    assert "no DMARC record at _dmarc.nowhere.test" in checks[-1].detail


async def test_a_silent_nameserver_is_a_timeout_failure_not_a_traceback() -> None:
    started = time.monotonic()
    async with DnsServer(GOOD, silent=True) as server:
        checks = await check_domain(
            "good.test", EXPECT, nameserver="127.0.0.1", port=server.port, timeout_s=0.5
        )
    assert {c.status for c in checks} == {Status.FAIL}
    assert all("timeout" in c.detail for c in checks), checks
    # The checks run together: one timeout's worth of waiting, not one per check.
    assert time.monotonic() - started < 3


async def test_a_nameserver_that_is_not_an_address_is_one_clear_failure() -> None:
    checks = await check_domain("good.test", EXPECT, nameserver="dns.example")
    assert len(checks) == 1
    assert checks[0].status is Status.FAIL
    assert "cannot use nameserver dns.example" in checks[0].detail


def test_render_table_aligns_and_summarises() -> None:
    checks = [
        Check("mx.count", Status.PASS, "2 MX record(s)"),
        Check("dkim:selector1", Status.FAIL, "key mismatch"),
        Check("dmarc", Status.WARN, "p=none"),
    ]
    lines = render_table(checks).splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    assert lines[2] == "FAIL    dkim:selector1  key mismatch"
    assert len({line.index(line.split()[2]) for line in lines[:4]}) == 1  # one detail column
    assert lines[-1] == "1 pass, 1 warn, 1 fail"
    assert render_table([]) == "no checks"


def test_exit_code() -> None:
    ok, warn, fail = (Check("x", s, "") for s in (Status.PASS, Status.WARN, Status.FAIL))
    assert exit_code([]) == 0
    assert exit_code([ok]) == 0
    assert exit_code([ok, warn]) == 1
    assert exit_code([warn, fail, ok]) == 2


async def test_cli_table_json_and_exit_code(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        "relays:\n"
        "  - {name: a, host: 127.0.0.1, egress_addresses: [192.0.2.25]}\n"
        "  - {name: b, host: 127.0.0.1, egress_addresses: [203.0.113.9]}\n"
        f"dns:\n  dkim: [{{selector: s1, public_key: {KEY}}}]\n"
    )
    async with DnsServer(GOOD) as server:
        code, out, err = await run_cli(
            "check-dns",
            "good.test",
            *("--config", str(config), "--nameserver", f"127.0.0.1:{server.port}", "--json"),
        )
    assert code == 2, err  # 203.0.113.9 is not in the SPF record
    rows = {r["check"]: r for r in json.loads(out)}
    assert rows["spf"]["status"] == "fail"
    assert "203.0.113.9" in rows["spf"]["detail"]
    assert rows["dkim:s1"]["status"] == "pass"
