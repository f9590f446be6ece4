"""SMTP AUTH on submission listeners, with real clients on loopback (issue #12).

PLAIN and LOGIN only under TLS; never on mx listeners; the users file reloaded on change;
failed attempts limited per client IP across the cluster; no secret in any log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import argon2
import pytest
import redis.asyncio as aioredis

from smtpfleet import replies
from smtpfleet.errors import ConfigError
from smtpfleet.inbound.auth import LocalFailureCounter
from smtpfleet.queue.auth_failures import RedisFailureCounter
from smtpfleet.queue.keys import Keys
from smtpfleet.testing import node_config, running_node
from smtpfleet.testing.inbound import Front, inbound_front
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles
from smtpfleet.testing.tools import need_program

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0
MX, SUBMISSION = 0, 1  # listener indexes: `listen` (mx) first, then `listeners`
USER, PASSWORD = "alice", "correct horse battery staple"
MESSAGE = b"Subject: hi\r\nMessage-ID: <auth@test>\r\n\r\nbody\r\n"
AUTH = "smtpfleet_smtp_auth_total"
# Cheap argon2 parameters: verification reads them from each hash, so tests stay fast.
HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def users_line(user: str, password: str) -> str:
    return f"{user}:{HASHER.hash(password)}\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("# user:hash\n" + users_line(USER, PASSWORD))
    return path


def auth_settings(certs: TlsFiles, users: Path, **auth: Any) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0"],
        "listeners": [{"address": "127.0.0.1:0", "profile": "submission"}],
        "accepted_domains": ["example.net"],
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
        "auth": {"users_file": str(users), **auth},
    }


@pytest.fixture
async def front(certs: TlsFiles, users: Path) -> AsyncIterator[Front]:
    async with inbound_front(auth_settings(certs, users, max_failures=3)) as running:
        yield running


class Wire:
    """A raw client: exact bytes and codes, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: tuple[str, int]) -> Wire:
        wire = cls(*await asyncio.open_connection(*address))
        assert (await wire.reply()).startswith("220 ")
        return wire

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), WAIT_S)).decode()
            if not line:
                return "".join(lines) or "<closed>"
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def starttls(self, certs: TlsFiles) -> str:
        """STARTTLS and the EHLO after it: the extensions offered under TLS."""
        assert (await self.cmd("STARTTLS")).startswith("220 ")
        await self.writer.start_tls(certs.client_context(), server_hostname="localhost")
        return await self.cmd("EHLO client.test")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def tls_session(address: tuple[str, int], certs: TlsFiles) -> Wire:
    wire = await Wire.open(address)
    await wire.cmd("EHLO client.test")
    await wire.starttls(certs)
    return wire


def line(reply: str) -> str:
    return reply + "\r\n"


# -- clients --------------------------------------------------------------------------------


def submit_with_smtplib(
    address: tuple[str, int], certs: TlsFiles, recipient: str, password: str = PASSWORD
) -> tuple[str, str]:
    """EHLO, STARTTLS, EHLO, AUTH (PLAIN), one message: (extensions before, after TLS)."""
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=WAIT_S) as client:
        client.ehlo()
        before = " ".join(f"{k} {v.strip()}" for k, v in client.esmtp_features.items())
        client.starttls(context=certs.client_context())
        client.ehlo()
        after = " ".join(f"{k} {v.strip()}" for k, v in client.esmtp_features.items())
        client.login(USER, password)
        client.sendmail("alice@example.com", [recipient], MESSAGE)
    return before, after


async def test_smtplib_logs_in_under_starttls_and_relays(front: Front, certs: TlsFiles) -> None:
    before, after = await asyncio.to_thread(
        submit_with_smtplib, front.address(SUBMISSION), certs, "someone@foreign.example"
    )
    assert "auth" not in before  # never advertised in clear
    assert "auth LOGIN PLAIN" in after
    (message,) = front.spool.messages
    assert message.recipients == ("someone@foreign.example",)  # a foreign domain: relayed
    assert " with ESMTPSA id " in message.data.decode()
    assert front.sample(AUTH, {"result": "ok"}) == 1


async def test_smtplib_wrong_password_is_535(front: Front, certs: TlsFiles) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        await asyncio.to_thread(
            submit_with_smtplib, front.address(SUBMISSION), certs, "r@example.net", "wrong"
        )
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error == b"5.7.8 Authentication credentials invalid"
    assert front.spool.messages == []
    # smtplib tries each mechanism offered: PLAIN, then LOGIN.
    assert front.sample(AUTH, {"result": "bad_credentials"}) == 2


async def test_auth_login_on_the_wire(front: Front, certs: TlsFiles) -> None:
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert (await wire.cmd("AUTH LOGIN")).startswith("334 ")
    assert (await wire.cmd(b64(USER))).startswith("334 ")
    assert await wire.cmd(b64(PASSWORD)) == line(replies.AUTH_OK)
    assert await wire.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(replies.AUTH_ALREADY)
    assert (await wire.cmd("MAIL FROM:<alice@example.com>")).startswith("250 ")
    await wire.close()


async def test_a_long_auth_response_line_is_answered_not_a_session_error(
    front: Front, certs: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 4954 §4: a response line may be 12,288 octets. Over 1,001 one was read past the
    session's line limit: `421 Local error` and a traceback in the log."""
    wire = await tls_session(front.address(SUBMISSION), certs)
    with caplog.at_level(logging.ERROR):
        assert (await wire.cmd("AUTH LOGIN")).startswith("334 ")
        long_user = base64.b64encode(b"u" * 9000).decode()  # 12,000 octets
        assert (await wire.cmd(long_user)).startswith("334 ")
        assert await wire.cmd(b64(PASSWORD)) == line(replies.AUTH_INVALID)  # no such user
        assert (await wire.cmd("NOOP")).startswith("250 ")
        assert (await wire.cmd("AUTH LOGIN")).startswith("334 ")
        too_long = base64.b64encode(b"u" * 9300).decode()  # 12,400 octets
        assert await wire.cmd(too_long) == line(replies.AUTH_LINE_TOO_LONG)
        # And a session that goes on: the right credentials are taken.
        assert (await wire.cmd("AUTH LOGIN")).startswith("334 ")
        assert (await wire.cmd(b64(USER))).startswith("334 ")
        assert await wire.cmd(b64(PASSWORD)) == line(replies.AUTH_OK)
    await wire.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_submission_needs_auth_before_mail(front: Front, certs: TlsFiles) -> None:
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert await wire.cmd("MAIL FROM:<alice@example.com>") == line(replies.AUTH_REQUIRED)
    assert await wire.cmd("RCPT TO:<r@example.net>") == line(replies.AUTH_REQUIRED)
    await wire.close()
    assert front.spool.messages == []


async def test_auth_in_clear_is_538_and_never_advertised(front: Front, certs: TlsFiles) -> None:
    wire = await Wire.open(front.address(SUBMISSION))
    ehlo = await wire.cmd("EHLO client.test")
    assert "250-STARTTLS" in ehlo
    assert "AUTH" not in ehlo
    assert await wire.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(
        replies.ENCRYPTION_REQUIRED
    )
    assert await wire.cmd("AUTH LOGIN") == line(replies.ENCRYPTION_REQUIRED)
    assert await wire.cmd("MAIL FROM:<alice@example.com>") == line(replies.AUTH_REQUIRED)
    await wire.close()
    assert front.sample(AUTH, {"result": "in_clear"}) == 2
    assert front.sample(AUTH, {"result": "ok"}) == 0


async def test_mx_listener_never_offers_auth(front: Front, certs: TlsFiles) -> None:
    wire = await Wire.open(front.address(MX))
    assert "AUTH" not in await wire.cmd("EHLO client.test")
    assert "AUTH" not in (await wire.cmd("HELP")).split()
    assert await wire.cmd("AUTH LOGIN") == line(replies.AUTH_NOT_OFFERED)
    assert "AUTH" not in await wire.starttls(certs)
    # Good credentials change nothing: no AUTH on port 25, and no relaying.
    assert await wire.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(replies.AUTH_NOT_OFFERED)
    assert (await wire.cmd("MAIL FROM:<alice@example.com>")).startswith("250 ")
    assert await wire.cmd("RCPT TO:<someone@foreign.example>") == line(replies.RELAY_DENIED)
    assert (await wire.cmd("RCPT TO:<r@example.net>")).startswith("250 ")
    await wire.close()


async def test_cancel_and_malformed_exchanges(front: Front, certs: TlsFiles) -> None:
    """RFC 4954 §4: `*` cancels; each gets one reply, and none counts as a failure."""
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert (await wire.cmd("AUTH PLAIN")).startswith("334 ")
    assert await wire.cmd("*") == "501 5.7.0 Auth aborted\r\n"
    assert await wire.cmd("NOOP") == line(replies.OK)
    assert (await wire.cmd("AUTH PLAIN not-base64")).startswith("501 5.5.2")
    assert (await wire.cmd("AUTH CRAM-MD5")).startswith("504 5.5.4")
    await wire.close()
    assert front.sample(AUTH, {"result": "malformed"}) == 3
    assert front.sample(AUTH, {"result": "bad_credentials"}) == 0


async def test_plain_may_not_ask_to_act_as_another_user(front: Front, certs: TlsFiles) -> None:
    """RFC 4616 §2: alice, with her own password, asking to act as bob is refused (aiosmtpd
    dropped the authorization identity and answered 235, as alice); naming herself is fine."""
    as_bob = b64(f"bob\0{USER}\0{PASSWORD}")
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert await wire.cmd(f"AUTH PLAIN {as_bob}") == line(replies.AUTH_OTHER_IDENTITY)
    assert await wire.cmd("MAIL FROM:<alice@example.com>") == line(replies.AUTH_REQUIRED)
    assert (await wire.cmd("AUTH PLAIN")).startswith("334 ")
    assert await wire.cmd(as_bob) == line(replies.AUTH_OTHER_IDENTITY)
    # RFC 4954 §4: `=` is an empty initial response, which names nobody.
    assert await wire.cmd("AUTH PLAIN =") == line(replies.AUTH_CANNOT_SPLIT)
    as_herself = b64(f"{USER}\0{USER}\0{PASSWORD}")
    assert await wire.cmd(f"AUTH PLAIN {as_herself}") == line(replies.AUTH_OK)
    await wire.close()
    assert front.sample(AUTH, {"result": "malformed"}) == 3
    assert front.sample(AUTH, {"result": "bad_credentials"}) == 0


async def test_failures_lock_the_client_out(front: Front, certs: TlsFiles) -> None:
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert await wire.cmd(f"AUTH PLAIN {plain(USER, 'x')}") == line(replies.AUTH_INVALID)
    # An unknown user gets the same reply.
    assert await wire.cmd(f"AUTH PLAIN {plain('mallory', 'x')}") == line(replies.AUTH_INVALID)
    # The third failure (max_failures) is told it is locked out, and the connection closes.
    assert await wire.cmd(f"AUTH PLAIN {plain(USER, 'y')}") == line(replies.AUTH_TOO_MANY_FAILURES)
    assert await wire.reply() == "<closed>"
    await wire.close()
    # Even the right password: 421 before the credentials are looked at.
    again = await tls_session(front.address(SUBMISSION), certs)
    assert await again.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(
        replies.AUTH_TOO_MANY_FAILURES
    )
    await again.close()
    assert front.sample(AUTH, {"result": "bad_credentials"}) == 2
    assert front.sample(AUTH, {"result": "locked_out"}) == 2
    assert front.sample(AUTH, {"result": "ok"}) == 0


async def test_users_file_is_reloaded(certs: TlsFiles, users: Path) -> None:
    settings = auth_settings(certs, users, reload_interval_s=0.05)
    async with inbound_front(settings) as front:
        address = front.address(SUBMISSION)
        wire = await tls_session(address, certs)
        assert await wire.cmd(f"AUTH PLAIN {plain('bob', 'pw')}") == line(replies.AUTH_INVALID)
        await wire.close()
        replacement = users.with_name("users.new")
        replacement.write_text(users_line("bob", "pw"))  # alice removed, bob added
        replacement.replace(users)
        await asyncio.sleep(0.1)
        wire = await tls_session(address, certs)
        assert await wire.cmd(f"AUTH PLAIN {plain('bob', 'pw')}") == line(replies.AUTH_OK)
        await wire.close()
        wire = await tls_session(address, certs)
        assert await wire.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(replies.AUTH_INVALID)
        await wire.close()


async def test_a_broken_users_file_stops_the_start(certs: TlsFiles, users: Path) -> None:
    # A password where the hash belongs.
    await asyncio.to_thread(users.write_text, f"{USER}:{PASSWORD}\n")
    with pytest.raises(ConfigError) as error:
        async with inbound_front(auth_settings(certs, users)):
            pass
    assert str(error.value) == f"inbound.auth.users_file: {users} line 1: expected user:$argon2..."
    assert PASSWORD not in str(error.value)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_authenticates_under_tls(front: Front, certs: TlsFiles, mechanism: str) -> None:
    host, port = front.address(SUBMISSION)
    process = await asyncio.create_subprocess_exec(
        need_program("swaks", "apt install swaks"),
        *("--server", host, "--port", str(port), "--helo", "swaks.test"),
        *("--from", "alice@example.com", "--to", "someone@foreign.example"),
        *("--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_file), "--tls-sni", "localhost"),
        *("--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()
    assert b"<~  235 2.7.0 Authentication successful" in output
    (message,) = front.spool.messages
    assert b" with ESMTPSA id " in message.data


async def test_implicit_tls_listener_offers_auth_at_once(certs: TlsFiles, users: Path) -> None:
    settings = auth_settings(certs, users)
    settings["listeners"] = [
        {"address": "127.0.0.1:0", "profile": "submission", "implicit_tls": True}
    ]
    async with inbound_front(settings) as front:
        reader, writer = await asyncio.open_connection(
            *front.address(SUBMISSION), ssl=certs.client_context(), server_hostname="localhost"
        )
        wire = Wire(reader, writer)
        assert (await wire.reply()).startswith("220 ")
        assert "250-AUTH LOGIN PLAIN" in await wire.cmd("EHLO client.test")
        assert await wire.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(replies.AUTH_OK)
        await wire.close()


# -- no secret in logs ----------------------------------------------------------------------


async def test_no_credential_reaches_a_log_at_any_level(
    front: Front, certs: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mail.log")
    secrets = [PASSWORD, b64(PASSWORD), b64(USER), plain(USER, PASSWORD), plain(USER, "guess")]
    # In clear: refused, then the LOGIN exchange a careless client sends anyway.
    wire = await Wire.open(front.address(SUBMISSION))
    await wire.cmd("EHLO client.test")
    assert await wire.cmd("AUTH LOGIN") == line(replies.ENCRYPTION_REQUIRED)
    assert (await wire.cmd(b64(USER))).startswith("500 5.5.1")
    assert (await wire.cmd(b64(PASSWORD))).startswith("500 5.5.1")
    await wire.close()
    # Under TLS: PLAIN with an initial response, a wrong one, and LOGIN.
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert await wire.cmd(f"AUTH PLAIN {plain(USER, 'guess')}") == line(replies.AUTH_INVALID)
    assert await wire.cmd(f"auth plain {plain(USER, PASSWORD)}") == line(replies.AUTH_OK)
    await wire.close()
    wire = await tls_session(front.address(SUBMISSION), certs)
    assert (await wire.cmd("AUTH LOGIN")).startswith("334 ")
    assert (await wire.cmd(b64(USER))).startswith("334 ")
    assert await wire.cmd(b64(PASSWORD)) == line(replies.AUTH_OK)
    await wire.close()
    await asyncio.sleep(0.1)  # the session tasks log their end
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "AUTH PLAIN ********" in logged  # aiosmtpd's records are there, redacted
    for secret in secrets:
        assert secret not in logged
    assert USER not in logged
    exposition = front.metrics.registry.collect()
    assert not any(USER in str(family) or PASSWORD in str(family) for family in exposition)


# -- the cluster-wide limit -----------------------------------------------------------------


async def test_failures_spread_over_two_nodes_lock_out_on_both(
    redis_url: str, prefix: str, sink: Sink, certs: TlsFiles, users: Path
) -> None:
    overrides = {
        "redis": {"prefix": prefix},
        "inbound": {
            "relay_networks": [],  # loopback may not relay without AUTH here
            "listeners": [{"address": "127.0.0.1:0", "profile": "submission"}],
            "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
            "auth": {"users_file": str(users), "max_failures": 4},
        },
    }
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as one, running_node(config) as two:
        nodes = [one.inbound.addresses[SUBMISSION], two.inbound.addresses[SUBMISSION]]
        # Three failures, alternating nodes: each node alone has seen fewer than four.
        for attempt in range(3):
            wire = await tls_session(nodes[attempt % 2], certs)
            assert await wire.cmd(f"AUTH PLAIN {plain(USER, str(attempt))}") == line(
                replies.AUTH_INVALID
            )
            await wire.close()
        wire = await tls_session(nodes[1], certs)
        assert await wire.cmd(f"AUTH PLAIN {plain(USER, 'x')}") == line(
            replies.AUTH_TOO_MANY_FAILURES
        )
        await wire.close()
        for address in nodes:  # the right password is refused on every node now
            wire = await tls_session(address, certs)
            assert await wire.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}") == line(
                replies.AUTH_TOO_MANY_FAILURES
            )
            await wire.close()
        assert one.metrics.registry.get_sample_value(AUTH, {"result": "locked_out"}) == 1


async def test_an_authenticated_client_relays_through_a_node(
    redis_url: str, prefix: str, sink: Sink, certs: TlsFiles, users: Path
) -> None:
    overrides = {
        "redis": {"prefix": prefix},
        "inbound": {
            "relay_networks": [],
            "accepted_domains": ["example.net"],
            "listeners": [{"address": "127.0.0.1:0", "profile": "submission"}],
            "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
            "auth": {"users_file": str(users)},
        },
    }
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        wire = await Wire.open(node.inbound.addresses[MX])
        await wire.cmd("EHLO client.test")
        await wire.cmd("MAIL FROM:<alice@example.com>")
        assert await wire.cmd("RCPT TO:<someone@foreign.example>") == line(replies.RELAY_DENIED)
        await wire.close()
        await asyncio.to_thread(
            submit_with_smtplib, node.inbound.addresses[SUBMISSION], certs, "x@foreign.example"
        )
        for _ in range(100):
            if sink.count:
                break
            await asyncio.sleep(0.05)
        (received,) = sink.messages
        assert received.recipients == ("x@foreign.example",)
        assert b" with ESMTPSA id " in received.data


async def test_without_redis_the_limit_is_per_node_not_none() -> None:
    # A port nothing listens on: every Redis call fails at once.
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    counter = RedisFailureCounter(
        client, Keys("t", 1), window_s=60, fallback=LocalFailureCounter(60), timeout_s=1.0
    )
    try:
        assert [await counter.add_failure("192.0.2.1") for _ in range(3)] == [1, 2, 3]
        assert await counter.failures("192.0.2.1") == 3
        assert await counter.failures("192.0.2.2") == 0
    finally:
        await client.aclose()


async def test_the_shared_count_lives_in_redis_and_expires(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix, 1)
    counter = RedisFailureCounter(client, keys, window_s=0.3, fallback=LocalFailureCounter(0.3))
    other_node = RedisFailureCounter(client, keys, window_s=0.3, fallback=LocalFailureCounter(0.3))
    try:
        assert await counter.add_failure("2001:db8::1") == 1
        assert await other_node.add_failure("2001:db8::1") == 2
        assert await counter.failures("2001:db8::1") == 2
        assert 0 < await client.pttl(keys.auth_failures("2001:db8::1")) <= 300
        await asyncio.sleep(0.4)
        assert await other_node.failures("2001:db8::1") == 0
    finally:
        await client.aclose()
