"""Inbound TLS with real clients on loopback: STARTTLS, implicit TLS, require_tls, reloads.

Certificates come from a CA each test makes (trustme); clients trust that CA only.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography.hazmat.primitives import serialization

from smtpfleet import replies
from smtpfleet.loadgen import run_load
from smtpfleet.testing.inbound import Front, inbound_front
from smtpfleet.testing.tls import TlsFiles, make_tls_files, openssl_starttls
from smtpfleet.testing.tools import need_program
from smtpfleet.testing.wire import Wire

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0
MESSAGE = b"Subject: hi\r\nMessage-ID: <tls@test>\r\n\r\nbody\r\n"
SESSIONS = "smtpfleet_smtp_sessions_total"
HANDSHAKES = "smtpfleet_tls_handshakes_total"


def tls_settings(certs: TlsFiles, **extra: Any) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0"],
        "accepted_domains": ["example.net"],
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
        **extra,
    }


@pytest.fixture
async def front(certs: TlsFiles) -> AsyncIterator[Front]:
    async with inbound_front(tls_settings(certs)) as running:
        yield running


def send_with_smtplib(address: tuple[str, int], context: ssl.SSLContext) -> tuple[str, str]:
    """EHLO, STARTTLS, EHLO, one message: (extensions before, extensions after)."""
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=WAIT_S) as client:
        client.ehlo()
        before = " ".join(client.esmtp_features)
        client.starttls(context=context)
        client.ehlo()
        after = " ".join(client.esmtp_features)
        client.sendmail("sender@example.com", ["rcpt@example.net"], MESSAGE)
    return before, after


async def test_smtplib_starttls_delivers_and_records_tls(front: Front, certs: TlsFiles) -> None:
    before, after = await asyncio.to_thread(
        send_with_smtplib, front.address(), certs.client_context()
    )
    assert "starttls" in before
    assert "starttls" not in after  # RFC 3207 §4.2: not offered again
    (message,) = front.spool.messages
    trace = message.data.split(b"\r\n\tby", 1)[0].decode() + message.data.decode().split("\n")[2]
    assert "(using TLSv1.3 with cipher TLS_" in trace
    assert " with ESMTPS id " in message.data.decode()
    assert (
        front.sample(HANDSHAKES, {"direction": "inbound", "result": "ok", "version": "TLSv1.3"})
        == 1
    )
    # connection_made ran twice (plain, then TLS): the session was admitted once.
    assert front.sample(SESSIONS, {"result": "accepted"}) == 1


async def test_plain_session_is_recorded_without_tls(front: Front) -> None:
    wire = await Wire.open(front.address())
    assert (await wire.reply()).startswith("220 ")
    assert "250-STARTTLS" in await wire.cmd("EHLO client.test")
    assert (await wire.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    assert (await wire.cmd("RCPT TO:<r@example.net>")).startswith("250")
    assert (await wire.cmd("DATA")).startswith("354")
    assert (await wire.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
    await wire.close()
    data = front.spool.messages[0].data.decode()
    assert " with ESMTP id " in data
    assert "using TLS" not in data


async def test_commands_pipelined_after_starttls_are_discarded(
    front: Front, certs: TlsFiles
) -> None:
    """RFC 3207 §6 (CVE-2011-0411): plaintext sent with STARTTLS must not run under TLS."""
    wire = await Wire.open(front.address())
    await wire.reply()
    await wire.cmd("EHLO client.test")
    wire.writer.write(
        b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nRCPT TO:<r@example.net>\r\n"
    )
    assert (await wire.reply()).startswith("220 2.0.0")
    await wire.starttls(certs.client_context())
    # The first reply under TLS is the one to our EHLO, not one to an injected command.
    assert (await wire.cmd("EHLO client.test")).startswith("250-mx.test")
    assert await wire.cmd("RCPT TO:<r@example.net>") == replies.NEED_MAIL + "\r\n"
    assert (await wire.cmd("MAIL FROM:<s@example.com>")).startswith("250 2.1.0")
    await wire.close()
    assert front.spool.messages == []


async def test_starttls_twice_is_refused(front: Front, certs: TlsFiles) -> None:
    wire = await Wire.open(front.address())
    await wire.reply()
    await wire.cmd("EHLO client.test")
    assert (await wire.cmd("STARTTLS")).startswith("220 2.0.0")
    await wire.starttls(certs.client_context())
    assert (await wire.cmd("STARTTLS")) == replies.TLS_ACTIVE + "\r\n"
    await wire.close()


async def test_failed_handshake_is_counted_and_frees_the_session(front: Front) -> None:
    untrusting = ssl.create_default_context()  # does not trust the test CA
    wire = await Wire.open(front.address())
    await wire.reply()
    await wire.cmd("EHLO client.test")
    assert (await wire.cmd("STARTTLS")).startswith("220")
    with pytest.raises(ssl.SSLCertVerificationError):
        await wire.starttls(untrusting)
    await wire.close()
    labels = {"direction": "inbound", "result": "failed", "version": "none"}
    for _ in range(100):
        if front.server.active_sessions == 0 and front.sample(HANDSHAKES, labels) == 1:
            break
        await asyncio.sleep(0.05)
    assert front.sample(HANDSHAKES, labels) == 1
    assert front.server.active_sessions == 0  # no session left registered


async def test_tls_older_than_1_2_is_refused(front: Front, certs: TlsFiles) -> None:
    old = certs.client_context()
    with warnings.catch_warnings():  # a client stuck in 2010 is what this test plays
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    wire = await Wire.open(front.address())
    await wire.reply()
    await wire.cmd("EHLO client.test")
    assert (await wire.cmd("STARTTLS")).startswith("220")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await wire.starttls(old)
    await wire.close()


def tls12_client(certs: TlsFiles, ciphers: str) -> ssl.SSLContext:
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


async def starttls_with(front: Front, context: ssl.SSLContext) -> str:
    """The cipher a STARTTLS with this client context agrees on."""
    wire = await Wire.open(front.address())
    await wire.reply()
    await wire.cmd("EHLO client.test")
    assert (await wire.cmd("STARTTLS")).startswith("220")
    try:
        await wire.starttls(context)
        ssl_object = wire.writer.get_extra_info("ssl_object")
        return str(ssl_object.cipher()[0])
    finally:
        await wire.close()


async def test_tls_1_2_offers_aead_suites_only(front: Front, certs: TlsFiles) -> None:
    """testssl.sh flagged the CBC suites OpenSSL offers by default (docs/security.md)."""
    aead = await starttls_with(front, tls12_client(certs, "ECDHE+AESGCM"))
    assert aead.startswith("ECDHE-")
    assert "GCM" in aead
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await starttls_with(front, tls12_client(certs, "ECDHE+AES256+SHA384:ECDHE+AES128+SHA256"))


async def test_require_tls_refuses_mail_in_clear(certs: TlsFiles) -> None:
    settings = tls_settings(
        certs, listen=[], listeners=[{"address": "127.0.0.1:0", "require_tls": True}]
    )
    async with inbound_front(settings) as front:
        wire = await Wire.open(front.address())
        await wire.reply()
        await wire.cmd("EHLO client.test")
        assert await wire.cmd("MAIL FROM:<s@example.com>") == replies.MUST_STARTTLS + "\r\n"
        assert (await wire.cmd("STARTTLS")).startswith("220")
        await wire.starttls(certs.client_context())
        await wire.cmd("EHLO client.test")
        assert (await wire.cmd("MAIL FROM:<s@example.com>")).startswith("250 2.1.0")
        await wire.close()


async def test_no_certificate_no_starttls() -> None:
    async with inbound_front({"listen": ["127.0.0.1:0"]}) as front:
        wire = await Wire.open(front.address())
        await wire.reply()
        assert "STARTTLS" not in await wire.cmd("EHLO client.test")
        assert await wire.cmd("STARTTLS") == replies.TLS_NOT_OFFERED + "\r\n"
        await wire.close()


def _tls_banner(port: int, context: ssl.SSLContext, before: bytes = b"") -> bytes:
    """A blocking client that sends `before` (a PROXY header) and its ClientHello in one
    write, as a load balancer or an eager client does; the banner it reads under TLS."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall((before if first else b"") + outgoing.read())
                first = False
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        sock.sendall(outgoing.read())  # the client's Finished
        while True:
            try:
                return tls.read(1024)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed before the banner") from None
                incoming.write(data)


def test_implicit_tls_clients_that_send_their_hello_at_once_all_get_in(certs: TlsFiles) -> None:
    """The ClientHello read before the TLS layer took the connection was thrown away, as
    plaintext after STARTTLS must be: the handshake never ended (7 of 10 at once failed).
    On uvloop, as the node runs: it reads a connection's first bytes as it accepts it."""
    settings = tls_settings(
        certs, listen=[], listeners=[{"address": "127.0.0.1:0", "implicit_tls": True}]
    )

    async def burst() -> tuple[list[bytes], float]:
        async with inbound_front(settings) as front:
            port = front.address()[1]
            clients = [
                asyncio.ensure_future(asyncio.to_thread(_tls_banner, port, certs.client_context()))
                for _ in range(10)
            ]
            await asyncio.sleep(0.05)  # the threads start
            # The node's loop busy for a moment (as a loaded one is): each connection and its
            # ClientHello are then read in one turn, before its session can start TLS.
            time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop on purpose
            banners = await asyncio.gather(*clients, return_exceptions=True)
            return [b if isinstance(b, bytes) else repr(b).encode() for b in banners], (
                front.sample(HANDSHAKES, {"result": "failed"})
            )

    banners, failed = uvloop.run(burst())
    assert all(b.startswith(b"220 mx.test") for b in banners), banners
    assert failed == 0


async def test_a_proxy_header_and_a_client_hello_in_one_packet(certs: TlsFiles) -> None:
    """A balancer's PROXY header with the client's first TLS bytes in the same segment, on
    a listener with both: the bytes after the header were dropped, and every such
    connection hung until the greeting timeout."""
    settings = tls_settings(
        certs,
        listen=[],
        listeners=[{"address": "127.0.0.1:0", "implicit_tls": True, "proxy_protocol": True}],
        trusted_proxies=["127.0.0.1/32"],
    )
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 465\r\n"
    async with inbound_front(settings) as front:
        port = front.address()[1]
        banner = await asyncio.to_thread(_tls_banner, port, certs.client_context(), header)
        assert banner.startswith(b"220 mx.test"), banner


async def test_implicit_tls_listener(certs: TlsFiles) -> None:
    settings = tls_settings(
        certs,
        listen=[],
        listeners=[
            {"address": "127.0.0.1:0"},
            {"address": "127.0.0.1:0", "implicit_tls": True},
        ],
    )
    async with inbound_front(settings) as front:
        wire = await Wire.open(
            front.address(1), ssl=certs.client_context(), server_hostname="localhost"
        )
        assert (await wire.reply()).startswith("220 mx.test")
        assert "STARTTLS" not in await wire.cmd("EHLO client.test")
        assert (await wire.cmd("MAIL FROM:<s@example.com>")).startswith("250")
        assert (await wire.cmd("RCPT TO:<r@example.net>")).startswith("250")
        assert (await wire.cmd("DATA")).startswith("354")
        assert (await wire.cmd(MESSAGE + b".\r\n")).startswith("250 2.0.0")
        await wire.close()
        assert b" with ESMTPS id " in front.spool.messages[0].data
        assert front.sample(SESSIONS, {"result": "accepted"}) == 1
        # The plain listener beside it still offers STARTTLS.
        plain = await Wire.open(front.address(0))
        await plain.reply()
        assert "250-STARTTLS" in await plain.cmd("EHLO client.test")
        await plain.close()


def _issuer(address: tuple[str, int], context: ssl.SSLContext) -> str:
    with smtplib.SMTP(*address, timeout=WAIT_S) as client:
        client.starttls(context=context)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        cert = sock.getpeercert()
        return str(cert["serialNumber"])


def _served_from_copies(pair: TlsFiles, live: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the pair in `live`, and a listener's settings that serve it and look at it
    again every 0.1 s: the files a test then replaces, as a rotation does."""
    live.mkdir()
    for name in ("cert.pem", "key.pem"):
        shutil.copy(pair.cert_file.parent / name, live / name)
    tls = {"cert_file": str(live / "cert.pem"), "key_file": str(live / "key.pem")}
    return live, {"listen": ["127.0.0.1:0"], "tls": {**tls, "reload_interval_s": 0.1}}


async def test_a_renewed_certificate_is_used_by_new_sessions(tmp_path: Path) -> None:
    first = make_tls_files(tmp_path / "first")
    live, settings = _served_from_copies(first, tmp_path / "live")
    async with inbound_front(settings) as front:
        old_serial = await asyncio.to_thread(_issuer, front.address(), first.client_context())
        second = make_tls_files(tmp_path / "second")  # another CA: a real rotation
        for name in ("cert.pem", "key.pem"):
            shutil.copy(second.cert_file.parent / name, live / name)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(_issuer, front.address(), second.client_context())  # reload
        new_serial = await asyncio.to_thread(_issuer, front.address(), second.client_context())
        assert new_serial != old_serial
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(_issuer, front.address(), first.client_context())


def _encrypted(key_file: Path) -> bytes:
    """The key, as `openssl pkey -aes256` would write it."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase"),
    )


async def test_an_encrypted_key_rotated_in_is_refused_without_a_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL asked for the passphrase on the node's terminal, its loop blocked there with
    every session (and `config check` too); without a terminal it printed the prompt into
    the log and said `[Errno 22] Invalid argument`. Now: one clear error, the old pair kept."""
    first = make_tls_files(tmp_path / "first")
    live, settings = _served_from_copies(first, tmp_path / "live")
    async with inbound_front(settings) as front:
        (live / "key.pem").write_bytes(_encrypted(first.key_file))
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.ERROR, logger="smtpfleet.inbound.reload"):
            serial = await asyncio.to_thread(_issuer, front.address(), first.client_context())
        assert serial == await asyncio.to_thread(_issuer, front.address(), first.client_context())
    said = [r.getMessage() for r in caplog.records]
    assert any("a node cannot ask for its passphrase" in line for line in said), said


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ("another key", "the private key does not belong to the certificate"),
        ("swapped", "holds a private key, not a certificate (cert_file and key_file swapped?)"),
    ],
)
async def test_a_bad_pair_rotated_in_is_logged_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str, said: str
) -> None:
    """The reload said OpenSSL's `[SSL] PEM lib (_ssl.c:3917)`, where the start-up check
    says what is wrong: now both say it the same way, naming the files."""
    first = make_tls_files(tmp_path / "first")
    live, settings = _served_from_copies(first, tmp_path / "live")
    async with inbound_front(settings) as front:
        if change == "another key":
            other = make_tls_files(tmp_path / "other")
            shutil.copy(other.key_file, live / "key.pem")
        else:
            (live / "cert.pem").write_bytes(first.key_file.read_bytes())
            (live / "key.pem").write_bytes(first.cert_file.read_bytes())
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.ERROR, logger="smtpfleet.inbound.reload"):
            serial = await asyncio.to_thread(_issuer, front.address(), first.client_context())
        assert serial == await asyncio.to_thread(_issuer, front.address(), first.client_context())
    lines = [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"cannot use {live / 'cert.pem'} with {live / 'key.pem'}: " in lines[0]
    assert said in lines[0]
    assert "PEM lib" not in lines[0]


async def test_swaks_sends_over_starttls(front: Front, certs: TlsFiles) -> None:
    host, port = front.address()
    process = await asyncio.create_subprocess_exec(
        need_program("swaks", "apt install swaks"),
        *("--server", host, "--port", str(port), "--helo", "swaks.test"),
        *("--from", "sender@example.com", "--to", "rcpt@example.net"),
        *("--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_file)),
        *("--tls-sni", "localhost"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()
    assert b"<-  220 2.0.0 Ready to start TLS" in output
    assert b"=== TLS started with cipher TLSv1.3" in output
    (message,) = front.spool.messages
    assert b"(using TLSv1.3 with cipher " in message.data


async def test_auth_is_not_offered_in_clear_or_under_tls(front: Front, certs: TlsFiles) -> None:
    wire = await Wire.open(front.address())
    await wire.reply()
    assert "AUTH" not in await wire.cmd("EHLO client.test")
    assert await wire.cmd("AUTH PLAIN AHVzZXIAcGFzcw==") == replies.AUTH_NOT_OFFERED + "\r\n"
    assert (await wire.cmd("STARTTLS")).startswith("220")
    await wire.starttls(certs.client_context())
    assert "AUTH" not in await wire.cmd("EHLO client.test")
    assert await wire.cmd("AUTH PLAIN AHVzZXIAcGFzcw==") == replies.AUTH_NOT_OFFERED + "\r\n"
    await wire.close()


async def test_the_load_generator_upgrades_every_connection(front: Front, certs: TlsFiles) -> None:
    """`smtpfleet loadtest --starttls` (and the TLS benchmark): one handshake per message."""
    result = await run_load(
        [front.address()], total=12, concurrency=3, per_session=1, starttls=certs.client_context()
    )
    assert result.codes == {250: 12}
    assert len(front.spool.messages) == 12
    assert all(b" with ESMTPS id " in m.data for m in front.spool.messages)
    handshakes = {"direction": "inbound", "result": "ok", "version": "TLSv1.3"}
    assert front.sample(HANDSHAKES, handshakes) == 12


async def test_one_session_ticket_per_handshake_and_a_client_resumes_with_it(
    front: Front, certs: TlsFiles, tmp_path: Path
) -> None:
    """OpenSSL's server default is two TLS 1.3 tickets per full handshake; Postfix's smtpd
    sends one, and so do we: a client caches one, and a ticket costs work on both sides."""
    openssl = need_program("openssl", "apt install openssl")
    session = tmp_path / "session.pem"
    address, ca = front.address(), certs.ca_file
    first = await openssl_starttls(openssl, address, ca, "-sess_out", str(session))
    assert "Verify return code: 0 (ok)" in first
    assert first.count("Post-Handshake New Session Ticket arrived") == 1
    assert "221 " in first  # the session went on under TLS to its QUIT
    resumed = await openssl_starttls(openssl, address, ca, "-sess_in", str(session))
    assert "Reused, TLSv1.3" in resumed
