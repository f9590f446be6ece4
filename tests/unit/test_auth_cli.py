"""`smtpfleet auth hash USER`: a users-file line from a password on stdin."""

from __future__ import annotations

import io

import pytest

from smtpfleet.cli import main
from smtpfleet.inbound.auth import Credentials


def test_hash_prints_a_line_the_users_file_takes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    assert main(["auth", "hash", "alice"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alice:$argon2id$")
    assert "s3cret" not in out
    assert Credentials.parse(out, "users").verify("alice", b"s3cret pass")


@pytest.mark.parametrize(
    ("user", "stdin"),
    [("a:b", "pw\n"), ("alice", "\n"), ("alice", b"\xff\xfe\n".decode("utf-8", "surrogateescape"))],
    ids=["colon", "empty", "not-utf8"],  # the last as Python reads undecodable stdin
)
def test_a_bad_user_or_an_empty_password_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], user: str, stdin: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["auth", "hash", user]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("smtpfleet: ")
