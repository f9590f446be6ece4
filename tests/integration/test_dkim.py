"""DKIM end to end: a real node signs at accept, a sink receives, dkimpy verifies; `check-dns`
compares the published key with the private key in use, over real DNS on loopback."""

from __future__ import annotations

import asyncio
import json
import smtplib
from pathlib import Path
from typing import Any

import argon2
import dkim
import pytest

from smtpfleet.errors import ConfigError
from smtpfleet.testing import (
    DnsServer,
    eventually,
    make_message,
    node_config,
    run_cli,
    running_node,
    send,
)
from smtpfleet.testing.dkim import DkimKeyFile, make_dkim_key, txt_lookup
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.timeout(60)

SELECTOR = "s2026"
RECORD_NAME = f"{SELECTOR}._domainkey.example.com"


@pytest.fixture
def key(tmp_path: Path) -> DkimKeyFile:
    return make_dkim_key(tmp_path / "dkim" / "example.com.pem")


def dkim_settings(key_file: Path | str, **extra: Any) -> dict[str, Any]:
    entry = {"domain": "example.com", "selector": SELECTOR, "key_file": str(key_file)}
    return {"dkim": {"keys": [entry], **extra}}


def metric(node: Any, domain: str, result: str) -> float:
    labels = {"domain": domain, "result": result}
    return node.registry.get_sample_value("smtpfleet_dkim_signatures_total", labels) or 0.0


async def test_delivered_mail_verifies_and_other_domains_go_unsigned(
    redis_url: str, prefix: str, sink: Sink, key: DkimKeyFile
) -> None:
    overrides = {"redis": {"prefix": prefix}, **dkim_settings(key.key_file)}
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        ours = make_message(sender="alice@example.com", subject="signed")
        theirs = make_message(sender="bob@example.org", subject="not ours")
        address = node.inbound.addresses[0]
        assert (await send(address, sender="alice@example.com", data=ours)).code == 250
        assert (await send(address, sender="bob@example.org", data=theirs)).code == 250
        await eventually(lambda: sink.count == 2)
        assert metric(node, "example.com", "signed") == 1
        assert metric(node, "none", "no_key") == 1
    by_subject = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0]: m.data for m in sink.messages}
    signed, unsigned = by_subject[b"signed"], by_subject[b"not ours"]
    # On top, above our Received: (RFC 6376 §3.5: prepended like a trace field).
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.index(b"\r\nReceived: from ") < signed.index(b"\r\n\r\n")
    published = txt_lookup({RECORD_NAME: key.txt_record()})
    assert dkim.verify(signed, dnsfunc=published)
    assert b"DKIM-Signature" not in unsigned
    assert not dkim.verify(signed.replace(b"hello", b"HELLO"), dnsfunc=published)


async def test_a_message_with_a_long_line_is_folded_before_it_is_signed(
    redis_url: str, prefix: str, sink: Sink, key: DkimKeyFile
) -> None:
    """Folded at accept, the relay sends on the bytes we signed: a relay that folded a line
    over 998 octets itself (as Postfix's SMTP client does) would break the signature."""
    overrides = {"redis": {"prefix": prefix}, **dkim_settings(key.key_file)}
    async with running_node(node_config(redis_url, [sink.address], overrides)) as node:
        html = "<p>" + "w" * 3000 + "</p>\r\n"  # as generated HTML often comes, on one line
        data = make_message(sender="alice@example.com", subject="long", body=html)
        reply = await send(node.inbound.addresses[0], sender="alice@example.com", data=data)
        assert reply.code == 250, reply
        await eventually(lambda: sink.count == 1)
        assert node.registry.get_sample_value("smtpfleet_smtp_lines_folded_total") == 3
    received = sink.messages[0].data
    assert max(len(line) for line in received.split(b"\r\n")) <= 998
    assert b"\r\n " + b"w" * 997 + b"\r\n " in received  # folded, not cut
    assert received.split(b"\r\n\r\n", 1)[1].count(b"w") == 3000
    assert dkim.verify(received, dnsfunc=txt_lookup({RECORD_NAME: key.txt_record()}))


async def test_mail_from_the_internet_with_our_from_is_not_signed(
    redis_url: str, prefix: str, sink: Sink, key: DkimKeyFile
) -> None:
    """A forged From: of ours, sent to an accepted domain by a client that may not relay, must
    not leave with our signature."""
    inbound = {"relay_networks": [], "accepted_domains": ["example.net"]}
    overrides = {"redis": {"prefix": prefix}, "inbound": inbound, **dkim_settings(key.key_file)}
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        forged = make_message(sender="ceo@example.com", recipients=["staff@example.net"])
        reply = await send(
            node.inbound.addresses[0],
            sender="ceo@example.com",
            recipients=["staff@example.net"],
            data=forged,
        )
        assert reply.code == 250
        await eventually(lambda: sink.count == 1)
        assert metric(node, "example.com", "signed") == 0
    assert b"DKIM-Signature" not in sink.messages[0].data


def submit(address: tuple[str, int], certs: TlsFiles, message: bytes) -> None:
    """STARTTLS, AUTH PLAIN as alice, one message: a submission client as people run one."""
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.login("alice", "alice-password")
        client.sendmail("alice@example.com", ["x@foreign.example"], message)


async def test_an_authenticated_submission_client_gets_its_mail_signed(
    redis_url: str, prefix: str, sink: Sink, key: DkimKeyFile, tmp_path: Path
) -> None:
    certs = make_tls_files(tmp_path / "tls")
    users = tmp_path / "users"
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    users.write_text(f"alice:{hasher.hash('alice-password')}\n")
    inbound = {
        "relay_networks": [],  # only AUTH lets a client relay (and get signed)
        "listen": [],
        "listeners": [{"address": "127.0.0.1:0", "profile": "submission"}],
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
        "auth": {"users_file": str(users)},
    }
    overrides = {"redis": {"prefix": prefix}, "inbound": inbound, **dkim_settings(key.key_file)}
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        message = make_message(sender="alice@example.com", recipients=["x@foreign.example"])
        await asyncio.to_thread(submit, node.inbound.addresses[0], certs, message)
        await eventually(lambda: sink.count == 1)
    received = sink.messages[0].data
    assert b" with ESMTPSA id " in received
    assert dkim.verify(received, dnsfunc=txt_lookup({RECORD_NAME: key.txt_record()}))


async def test_a_node_with_an_unusable_key_does_not_start(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    config = node_config(redis_url, [], {"redis": {"prefix": prefix}, **dkim_settings(bad)})
    with pytest.raises(ConfigError, match=r"dkim\.keys\.0\.key_file: .*not an RSA private key"):
        async with running_node(config):
            pass


def write_config(path: Path, key_file: Path | str) -> Path:
    path.write_text(
        f"dkim:\n  keys: [{{domain: example.com, selector: {SELECTOR}, key_file: '{key_file}'}}]\n"
    )
    return path


async def test_config_check_reads_the_keys(tmp_path: Path, key: DkimKeyFile) -> None:
    code, out, err = await run_cli(
        "config", "check", str(write_config(tmp_path / "a.yaml", key.key_file))
    )
    assert code == 0, err
    assert "DKIM for example.com" in out
    missing = write_config(tmp_path / "b.yaml", tmp_path / "missing.pem")
    code, out, err = await run_cli("config", "check", str(missing))
    assert code == 2
    assert "dkim.keys.0.key_file: cannot read" in err
    assert "Traceback" not in err


def zone(txt: str) -> dict[str, Any]:
    return {
        "example.com": {"MX": (300, ["10 mx1.example.com.", "10 mx2.example.com."])},
        "mx1.example.com": {"A": (300, ["192.0.2.10"])},
        "mx2.example.com": {"A": (300, ["192.0.2.11"])},
        RECORD_NAME: {
            "TXT": (300, [" ".join(f'"{txt[i : i + 200]}"' for i in range(0, len(txt), 200))])
        },
    }


async def check_dns(tmp_path: Path, key_file: Path, published: str) -> tuple[int, dict[str, Any]]:
    config = write_config(tmp_path / "node.yaml", key_file)
    async with DnsServer(zone(published)) as server:
        code, out, err = await run_cli(
            "check-dns",
            "example.com",
            *("--config", str(config), "--nameserver", f"127.0.0.1:{server.port}", "--json"),
        )
    assert "Traceback" not in err
    return code, {row["check"]: row for row in json.loads(out)}


async def test_check_dns_passes_when_the_published_key_is_the_one_in_use(
    tmp_path: Path, key: DkimKeyFile
) -> None:
    _, rows = await check_dns(tmp_path, key.key_file, key.txt_record())
    assert rows[f"dkim:{SELECTOR}"]["status"] == "pass", rows
    assert "key matches" in rows[f"dkim:{SELECTOR}"]["detail"]


async def test_check_dns_fails_when_another_key_is_published(
    tmp_path: Path, key: DkimKeyFile
) -> None:
    stale = make_dkim_key(tmp_path / "previous.pem")  # e.g. DNS not yet updated after rotation
    code, rows = await check_dns(tmp_path, key.key_file, stale.txt_record())
    assert code == 2
    assert rows[f"dkim:{SELECTOR}"]["status"] == "fail"
    assert "key mismatch" in rows[f"dkim:{SELECTOR}"]["detail"]
