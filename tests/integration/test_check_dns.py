"""`check-dns` against a real DNS server on loopback serving good and broken zones."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpfleet.dnscheck import DnsExpectations, Status, check_domain, exit_code
from smtpfleet.testing_dns import DnsServer

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


async def run(z: dict[str, Any], expect: DnsExpectations = EXPECT) -> dict[str, tuple[Status, str]]:
    async with DnsServer(z) as server:
        checks = await check_domain("good.test", expect, nameserver="127.0.0.1", port=server.port)
    return {c.name: (c.status, c.detail) for c in checks}


async def test_a_good_domain_passes_everything() -> None:
    result = await run(GOOD)
    assert {name: status for name, (status, _) in result.items()} == {
        "mx.count": Status.PASS,
        "mx.priority": Status.PASS,
        "mx.targets": Status.PASS,
        "mx.ttl": Status.PASS,
        "spf": Status.PASS,
        "dkim:s1": Status.PASS,
        "dmarc": Status.PASS,
    }
    assert "p=reject pct=100" in result["dmarc"][1]


@pytest.mark.parametrize(
    ("records", "check", "status", "detail"),
    [
        ({"good.test": {"MX": (300, ["10 mx1.good.test."])}}, "mx.count", Status.FAIL, "1 MX"),
        (
            {"good.test": {"MX": (300, ["10 mx1.good.test.", "20 mx2.good.test."])}},
            "mx.priority",
            Status.WARN,
            "differ",
        ),
        (
            {"good.test": {"MX": (300, ["10 mx1.good.test.", "10 mx3.good.test."])}},
            "mx.targets",
            Status.FAIL,
            "mx3.good.test has no A/AAAA",
        ),
        (
            {"good.test": {"MX": (300, ["10 mx1.good.test.", "10 192.0.2.1."])}},
            "mx.targets",
            Status.FAIL,
            "IP literal",
        ),
        (
            {"good.test": {"MX": (3600, ["10 mx1.good.test.", "10 mx2.good.test."])}},
            "mx.ttl",
            Status.WARN,
            "3600",
        ),
        (
            {"good.test": {"TXT": (300, ['"google-site-verification=x"'])}},
            "spf",
            Status.FAIL,
            "no SPF",
        ),
        (
            {"good.test": {"TXT": (300, ['"v=spf1 -all"', '"v=spf1 ip4:192.0.2.0/24 -all"'])}},
            "spf",
            Status.FAIL,
            "2 SPF records",
        ),
        (
            {"good.test": {"TXT": (300, ['"v=spf1 ip4:192.0.2.0/24 -all"'])}},
            "spf",
            Status.FAIL,
            "not authorized: 198.51.100.7",
        ),
        (
            {"_spf.other.test": {"TXT": (300, ['"v=spf1 include:good.test -all"'])}},
            "spf",
            Status.FAIL,
            "lookups",
        ),
        ({"s1._domainkey.good.test": None}, "dkim:s1", Status.FAIL, "s1._domainkey.good.test"),
        (
            {"s1._domainkey.good.test": {"TXT": (300, ['"v=DKIM1; p=OTHERKEY"'])}},
            "dkim:s1",
            Status.FAIL,
            "key mismatch",
        ),
        (
            {"s1._domainkey.good.test": {"TXT": (300, ['"v=DKIM1; p="'])}},
            "dkim:s1",
            Status.FAIL,
            "revoked",
        ),
        ({"_dmarc.good.test": None}, "dmarc", Status.FAIL, "no DMARC"),
        (
            {"_dmarc.good.test": {"TXT": (300, ['"v=DMARC1; p=none"'])}},
            "dmarc",
            Status.WARN,
            "p=none",
        ),
    ],
)
async def test_each_kind_of_drift_is_reported(
    records: dict[str, Any], check: str, status: Status, detail: str
) -> None:
    broken = copy.deepcopy(GOOD)
    for name, value in records.items():
        if value is None:
            broken.pop(name)
        else:
            broken[name] = {**broken.get(name, {}), **value}
    result = await run(broken)
    assert result[check][0] is status, result[check]
    assert detail in result[check][1]


async def test_a_missing_domain_fails_cleanly() -> None:
    async with DnsServer({}) as server:
        checks = await check_domain(
            "nowhere.test", EXPECT, nameserver="127.0.0.1", port=server.port
        )
    assert exit_code(checks) == 2
    assert checks[0].detail == "nowhere.test does not exist"


async def test_cli_table_json_and_exit_code(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        "relays:\n"
        "  - {name: a, host: 127.0.0.1, egress_addresses: [192.0.2.25]}\n"
        "  - {name: b, host: 127.0.0.1, egress_addresses: [203.0.113.9]}\n"
        f"dns:\n  dkim: [{{selector: s1, public_key: {KEY}}}]\n"
    )
    async with DnsServer(GOOD) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smtpfleet",
            "check-dns",
            "good.test",
            "--config",
            str(config),
            "--nameserver",
            f"127.0.0.1:{server.port}",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 2, err  # 203.0.113.9 is not in the SPF record
    rows = {r["check"]: r for r in json.loads(out)}
    assert rows["spf"]["status"] == "fail"
    assert "203.0.113.9" in rows["spf"]["detail"]
    assert rows["dkim:s1"]["status"] == "pass"
