"""AUTH logic with plain values: the users file, the failure counter, log redaction."""

from __future__ import annotations

import logging

import argon2
import pytest

from smtpfleet import replies
from smtpfleet.inbound.auth import (
    AuthCheck,
    Authenticator,
    Credentials,
    LocalFailureCounter,
    hash_password,
    initial_response,
    plain_credentials,
)
from smtpfleet.inbound.redact import REDACTED, RedactCredentials, redact

HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ALICE = HASHER.hash("s3cret")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_parse_reads_users_and_skips_comments() -> None:
    credentials = Credentials.parse(f"# users\n\n alice:{ALICE} \nbob:{ALICE}\n", "users")
    assert sorted(credentials.hashes) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice:hunter2\n", "users line 1: expected user:$argon2..."),
        ("# c\n:$argon2id$v=19$x\n", "users line 2: expected user:$argon2..."),
        ("alice\n", "users line 1: expected user:$argon2..."),
        ("alice:$argon2id$garbage\n", "users line 1: not a valid argon2 hash"),
    ],
)
def test_a_broken_line_is_named_without_its_content(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=r".*") as raised:
        Credentials.parse(text, "users")
    assert str(raised.value) == error


def test_verify_takes_the_right_password_only() -> None:
    credentials = Credentials({"alice": ALICE})
    assert credentials.verify("alice", b"s3cret")
    assert not credentials.verify("alice", b"S3cret")
    assert not credentials.verify("mallory", b"s3cret")  # checked against alice's hash: refused
    assert not Credentials({}).verify("alice", b"s3cret")


def test_hash_password_makes_a_line_the_file_takes() -> None:
    encoded = hash_password("pw")
    assert encoded.startswith("$argon2id$")
    assert Credentials.parse(f"u:{encoded}", "users").verify("u", b"pw")


async def test_local_counter_forgets_failures_older_than_the_window() -> None:
    clock = Clock()
    counter = LocalFailureCounter(60, clock)
    assert await counter.add_failure("192.0.2.1") == 1
    clock.now += 30
    assert await counter.add_failure("192.0.2.1") == 2
    assert await counter.failures("192.0.2.2") == 0
    clock.now += 31
    assert await counter.failures("192.0.2.1") == 1
    clock.now += 30
    assert await counter.failures("192.0.2.1") == 0


async def test_the_failure_that_reaches_the_limit_blocks() -> None:
    clock = Clock()
    auth = Authenticator(lambda: Credentials({"alice": ALICE}), LocalFailureCounter(60, clock), 2)
    assert await auth.check("192.0.2.1", b"alice", b"s3cret") is AuthCheck.OK
    assert await auth.check("192.0.2.1", b"alice", b"x") is AuthCheck.INVALID
    assert not await auth.blocked("192.0.2.1")
    assert await auth.check("192.0.2.1", b"\xff", b"x") is AuthCheck.BLOCKED
    assert await auth.blocked("192.0.2.1")
    assert not await auth.blocked("192.0.2.9")
    clock.now += 61
    assert not await auth.blocked("192.0.2.1")


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        (b"AUTH PLAIN AGFsaWNlAHMzY3JldA==", "AUTH PLAIN ********"),
        ("auth login YWxpY2U=", "AUTH login ********"),
        (b"AUTH LOGIN", "AUTH LOGIN ********"),
        (b"YWxpY2U=", REDACTED),  # a LOGIN response where a command was expected
        ("czNjcmV0", REDACTED),
        (b"MAIL FROM:<a@example.com>", b"MAIL FROM:<a@example.com>"),
        ("EHLO client.test", "EHLO client.test"),
        (("127.0.0.1", 25), ("127.0.0.1", 25)),
        (7, 7),
    ],
)
def test_redact(value: object, logged: object) -> None:
    assert redact(value) == logged


def test_the_filter_rewrites_client_input_but_not_our_replies() -> None:
    flt = RedactCredentials()
    read = logging.LogRecord("mail.log", 20, "", 0, "%r >> %r", (("::1", 1), b"czNjcmV0"), None)
    said = logging.LogRecord("mail.log", 10, "", 0, "%r << %r", (("::1", 1), b"235 2.7.0 Ok"), None)
    assert flt.filter(read)
    assert flt.filter(said)
    assert read.getMessage() == "('::1', 1) >> '<redacted>'"
    assert said.getMessage() == "('::1', 1) << b'235 2.7.0 Ok'"


@pytest.mark.parametrize(
    ("text", "decoded"),
    [("=", b""), ("AGFsaWNlAHg=", b"\0alice\0x"), ("not-base64", None), ("YQ", None), ("é", None)],
)
def test_an_initial_response_is_base64_or_the_empty_sign(text: str, decoded: bytes | None) -> None:
    assert initial_response(text) == decoded


@pytest.mark.parametrize(
    ("response", "result"),
    [
        (b"\0alice\0pw", (b"alice", b"pw")),
        (b"alice\0alice\0pw", (b"alice", b"pw")),
        (b"bob\0alice\0pw", replies.AUTH_OTHER_IDENTITY),
        (b"alice\0pw", replies.AUTH_CANNOT_SPLIT),
        (b"\0al\0ice\0pw", replies.AUTH_CANNOT_SPLIT),
        (b"", replies.AUTH_CANNOT_SPLIT),
    ],
)
def test_plain_names_one_user_who_acts_as_no_one_else(
    response: bytes, result: tuple[bytes, bytes] | str
) -> None:
    assert plain_credentials(response) == result
