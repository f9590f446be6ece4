"""DKIM signing: what is signed, with which key, and what happens when it cannot be."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpfleet.config import build_config
from smtpfleet.errors import ConfigError, SigningFailed
from smtpfleet.inbound import dkim as inbound_dkim
from smtpfleet.inbound import signing
from smtpfleet.inbound.dkim import (
    KeyProblem,
    SigningKey,
    author_domain,
    parse_private_key,
    public_key,
    same_public_key,
    signature,
)
from smtpfleet.inbound.signing import DkimSigner, load_keys
from smtpfleet.metrics import Metrics
from smtpfleet.testing.dkim import DkimKeyFile, make_dkim_key, txt_lookup

MESSAGE = (
    b"Received: from client (client [192.0.2.1]) by mx; Sat, 28 Nov 2026 05:00:00 +0000\r\n"
    b"From: Alice <alice@Example.COM>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n\r\nthe numbers are in.\r\n"
)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DkimKeyFile:
    return make_dkim_key(tmp_path_factory.mktemp("dkim") / "example.com.pem")


def signing_key(key: DkimKeyFile, **overrides: object) -> SigningKey:
    values: dict[str, object] = {
        "domain": "example.com",
        "selector": "s1",
        "pem": parse_private_key(key.key_file.read_bytes()),
    }
    values.update(overrides)
    return SigningKey(**values)  # type: ignore[arg-type]


def verifies(message: bytes, key: DkimKeyFile, name: str = "s1._domainkey.example.com") -> bool:
    return bool(dkim.verify(message, dnsfunc=txt_lookup({name: key.txt_record()})))


# -- signing and verifying ------------------------------------------------------------------


def test_a_signed_message_verifies_against_the_published_key(key: DkimKeyFile) -> None:
    header = signature(MESSAGE, signing_key(key))
    assert header.startswith(b"DKIM-Signature: ")
    assert header.endswith(b"\r\n")
    fields = dict(
        part.strip().split("=", 1) for part in header.decode()[16:].split(";") if "=" in part
    )
    assert fields["d"] == "example.com"
    assert fields["s"] == "s1"
    assert fields["c"] == "relaxed/relaxed"
    assert fields["a"] == "rsa-sha256"
    signed_headers = [h.strip() for h in "".join(fields["h"].split()).split(":")]
    assert signed_headers.count("from") == 2  # oversigned: no From can be added later
    assert "received" not in signed_headers  # trace fields are not signed (RFC 6376 §5.4.1)
    assert verifies(header + MESSAGE, key)


def test_relaxed_canonicalization_survives_refolding_and_another_received(
    key: DkimKeyFile,
) -> None:
    signed = signature(MESSAGE, signing_key(key)) + MESSAGE
    in_transit = b"Received: by relay; Sat, 28 Nov 2026 05:00:01 +0000\r\n" + signed.replace(
        b"Subject: quarterly report", b"Subject:  quarterly\r\n  report"
    )
    assert verifies(in_transit, key)


def test_a_changed_body_or_signed_header_fails(key: DkimKeyFile) -> None:
    signed = signature(MESSAGE, signing_key(key)) + MESSAGE
    assert not verifies(signed.replace(b"numbers", b"Numbers"), key)
    assert not verifies(signed.replace(b"quarterly", b"annual"), key)


def test_another_published_key_fails(key: DkimKeyFile, tmp_path: Path) -> None:
    other = make_dkim_key(tmp_path / "other.pem")
    signed = signature(MESSAGE, signing_key(key)) + MESSAGE
    assert not verifies(signed, other)


def test_configured_headers_and_canonicalization_are_used(key: DkimKeyFile) -> None:
    chosen = signing_key(key, headers=("from", "subject"), canonicalization="simple/simple")
    header = signature(MESSAGE, chosen)
    assert b"c=simple/simple" in header
    assert b"h=from : subject;" in header.replace(b"\r\n ", b" ")
    assert verifies(header + MESSAGE, key)


def test_a_header_line_that_is_no_field_cannot_be_signed(key: DkimKeyFile) -> None:
    with pytest.raises(dkim.DKIMException):
        signature(b"From: a@example.com\r\nnot a field\r\n\r\nbody\r\n", signing_key(key))


# -- the From: domain -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "domain"),
    [
        (b"From: a@Example.COM", "example.com"),
        (b'FROM:\r\n  "Doe, Jane" <jane@mail.example.org.>', "mail.example.org"),
        (b"Subject: x\r\nfrom : <a@example.net>", "example.net"),
        (b"Subject: no author", None),
        (b"From: a@example.com\r\nFrom: b@example.com", None),  # two From: fields
        (b"From: a@example.com, b@example.org", None),  # two authors: no one domain
        (b"From: undisclosed", None),
        (b"X-From: a@example.com", None),
    ],
)
def test_author_domain(head: bytes, domain: str | None) -> None:
    assert author_domain(head + b"\r\n\r\nFrom: body@example.com\r\n") == domain


# -- keys -----------------------------------------------------------------------------------


def _pem(bits: int, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def test_pkcs1_and_crlf_keys_are_read() -> None:
    pem = _pem(1024, serialization.PrivateFormat.TraditionalOpenSSL).replace(b"\n", b"\r\n")
    assert parse_private_key(pem).startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")


@pytest.mark.parametrize(
    ("pem", "problem"),
    [
        (b"", "not an RSA private key"),
        (b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n", "not an RSA"),
        (_pem(1024, serialization.PrivateFormat.PKCS8, b"secret"), "encrypted"),
    ],
    ids=["empty", "not-rsa", "encrypted"],  # the same names in every run (a key is made here)
)
def test_unusable_keys_are_refused_without_their_content(pem: bytes, problem: str) -> None:
    with pytest.raises(KeyProblem, match=problem) as caught:
        parse_private_key(pem)
    assert "MII" not in str(caught.value)


def test_a_short_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # cryptography makes nothing under 1024 bits: raise the floor instead.
    monkeypatch.setattr(inbound_dkim, "MIN_KEY_BITS", 2048)
    with pytest.raises(KeyProblem, match="a 1024-bit RSA key: at least 2048 bits"):
        parse_private_key(_pem(1024, serialization.PrivateFormat.PKCS8))


def test_the_public_key_is_the_subject_public_key_info(key: DkimKeyFile) -> None:
    assert public_key(parse_private_key(key.key_file.read_bytes())) == key.public_key


def test_same_public_key_compares_key_material(key: DkimKeyFile, tmp_path: Path) -> None:
    # p= may carry a bare RSAPublicKey (PKCS#1) instead of a SubjectPublicKeyInfo.
    loaded = serialization.load_pem_private_key(key.key_file.read_bytes(), password=None)
    pkcs1 = loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    assert same_public_key(base64.b64encode(pkcs1).decode(), key.public_key)
    assert same_public_key(key.public_key, key.public_key)
    assert not same_public_key(make_dkim_key(tmp_path / "k.pem").public_key, key.public_key)
    assert not same_public_key("not base64!", key.public_key)


# -- config ---------------------------------------------------------------------------------


def dkim_config(*keys: dict[str, object], **settings: object) -> dict[str, object]:
    return {"dkim": {"keys": list(keys), **settings}}


KEY = {"domain": "Example.COM.", "selector": "s1", "key_file": "/k.pem"}


def test_config_defaults_and_normalizes_the_domain() -> None:
    config = build_config(dkim_config(KEY)).dkim
    assert config.keys[0].domain == "example.com"
    assert config.keys[0].canonicalization.value == "relaxed/relaxed"
    assert config.keys[0].headers == []
    assert config.on_failure.value == "accept"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"headers": ["Subject"]}, "must include From"),
        ({"headers": ["From", "Received"]}, "must not sign received"),
        ({"canonicalization": "relaxed"}, "dkim.keys.0.canonicalization"),
        ({"domain": "not a domain"}, "is not a domain name"),
        ({"selector": "s 1"}, "dkim.keys.0.selector"),
    ],
)
def test_config_refuses(change: dict[str, object], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        build_config(dkim_config({**KEY, **change}))


def test_config_refuses_two_keys_for_one_domain() -> None:
    with pytest.raises(ConfigError, match=r"one key per domain: example\.com"):
        build_config(dkim_config(KEY, {**KEY, "selector": "s2"}))


def test_unreadable_or_bad_key_files_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    config = build_config(
        dkim_config(
            {**KEY, "key_file": str(tmp_path / "missing.pem")},
            {**KEY, "domain": "example.org", "key_file": str(tmp_path / "bad.pem")},
        )
    ).dkim
    with pytest.raises(ConfigError) as caught:
        load_keys(config)
    assert "dkim.keys.0.key_file: cannot read" in str(caught.value)
    assert "dkim.keys.1.key_file" in str(caught.value)
    assert "not an RSA private key" in str(caught.value)


# -- the signer: which mail, metrics, failures ----------------------------------------------


def signer_for(key: DkimKeyFile, **settings: object) -> tuple[DkimSigner, Metrics]:
    metrics = Metrics()
    config = build_config(dkim_config({**KEY, "key_file": str(key.key_file)}, **settings))
    signer = DkimSigner(config.dkim, metrics)
    signer.load()
    return signer, metrics


def count(metrics: Metrics, domain: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "smtpfleet_dkim_signatures_total", {"domain": domain, "result": result}
    )
    return value or 0.0


async def test_mail_of_a_signing_domain_is_signed_and_counted(key: DkimKeyFile) -> None:
    signer, metrics = signer_for(key)
    signed = await signer.sign(MESSAGE)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(MESSAGE)
    assert verifies(signed, key)
    assert count(metrics, "example.com", "signed") == 1


async def test_mail_of_other_domains_is_left_alone(key: DkimKeyFile) -> None:
    signer, metrics = signer_for(key)
    other = MESSAGE.replace(b"alice@Example.COM", b"alice@example.net")
    assert await signer.sign(other) == other
    assert count(metrics, "none", "no_key") == 1
    assert count(metrics, "example.com", "signed") == 0


BROKEN = b"From: a@example.com\r\nnot a field\r\n\r\nbody\r\n"


async def test_a_failure_queues_unsigned_by_default(
    key: DkimKeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    signer, metrics = signer_for(key)
    with caplog.at_level(logging.WARNING):
        assert await signer.sign(BROKEN) == BROKEN
    assert "queued unsigned" in caplog.text
    assert count(metrics, "example.com", "failed") == 1


async def test_a_failure_is_a_tempfail_when_configured(key: DkimKeyFile) -> None:
    signer, metrics = signer_for(key, on_failure="tempfail")
    with pytest.raises(SigningFailed):
        await signer.sign(BROKEN)
    assert count(metrics, "example.com", "failed") == 1


async def test_a_large_message_is_signed_too(key: DkimKeyFile) -> None:
    signer, _ = signer_for(key)
    large = MESSAGE + (b"x" * 76 + b"\r\n") * 5000
    assert verifies(await signer.sign(large), key)


async def test_a_replaced_key_file_is_used_and_a_broken_one_is_not(
    key: DkimKeyFile, tmp_path: Path
) -> None:
    current = make_dkim_key(tmp_path / "current.pem")
    signer, _ = signer_for(current, reload_interval_s=0.001)
    assert verifies(await signer.sign(MESSAGE), current)
    # How a Kubernetes secret changes: a new file swapped in under the same name.
    replacement = make_dkim_key(tmp_path / "next.pem")
    os.replace(replacement.key_file, current.key_file)
    await asyncio.sleep(0.01)
    assert verifies(await signer.sign(MESSAGE), replacement)
    broken = tmp_path / "broken.pem"
    broken.write_text("not a key")
    os.replace(broken, current.key_file)
    await asyncio.sleep(0.01)
    assert verifies(await signer.sign(MESSAGE), replacement)  # the last good key stays


async def test_an_unexpected_error_follows_on_failure_too(
    key: DkimKeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(message: bytes, key: SigningKey) -> bytes:
        raise RuntimeError("a bug in the signing path")

    monkeypatch.setattr(signing, "signature", broken)
    signer, metrics = signer_for(key)
    assert await signer.sign(MESSAGE) == MESSAGE
    tempfail, _ = signer_for(key, on_failure="tempfail")
    with pytest.raises(SigningFailed):
        await tempfail.sign(MESSAGE)
    assert count(metrics, "example.com", "failed") == 1
