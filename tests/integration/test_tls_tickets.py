"""One TLS ticket key across processes and nodes: a sender resumes its session on any of them.

Real servers on loopback, resumed by `openssl s_client -sess_in` as a sending MTA resumes
from its session cache; OpenSSL gives each server context a key of its own otherwise.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from smtpfleet.errors import ConfigError
from smtpfleet.inbound.tls_tickets import KEY_BYTES, TicketKeyError, read_key
from smtpfleet.testing.inbound import inbound_front
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.tls import TlsFiles, openssl_starttls
from smtpfleet.testing.tools import need_program

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def ticket_key(tmp_path: Path) -> Path:
    path = tmp_path / "ticket.key"
    path.write_bytes(os.urandom(KEY_BYTES))
    return path


def tls_settings(certs: TlsFiles, **tls: str) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0"],
        "accepted_domains": ["example.net"],
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file), **tls},
    }


async def handshake(address: tuple[str, int], ca: Path, *session: str) -> str:
    """One STARTTLS session by `openssl s_client`: "New" or "Reused"."""
    openssl = need_program("openssl", "apt install openssl")
    text = await openssl_starttls(openssl, address, ca, *session)
    assert "221 " in text, text  # the session went on under TLS to its QUIT
    for outcome in ("Reused", "New"):
        if f"{outcome}, TLSv1.3" in text:
            return outcome
    raise AssertionError(text)


async def test_nodes_with_one_ticket_key_resume_each_others_sessions(
    certs: TlsFiles, ticket_key: Path, tmp_path: Path
) -> None:
    session = tmp_path / "session.pem"
    shared = tls_settings(certs, ticket_key_file=str(ticket_key))
    async with inbound_front(shared) as first, inbound_front(shared) as second:
        assert await handshake(first.address(), certs.ca_file, "-sess_out", str(session)) == "New"
        assert await handshake(second.address(), certs.ca_file, "-sess_in", str(session)) == (
            "Reused"
        )
    # The same two nodes without the file: each has OpenSSL's own key, the ticket is no use.
    async with (
        inbound_front(tls_settings(certs)) as first,
        inbound_front(tls_settings(certs)) as second,
    ):
        await handshake(first.address(), certs.ca_file, "-sess_out", str(session))
        assert await handshake(second.address(), certs.ca_file, "-sess_in", str(session)) == "New"


async def test_a_replaced_ticket_key_is_used_for_new_sessions(
    certs: TlsFiles, ticket_key: Path, tmp_path: Path
) -> None:
    """Rotation: tickets under the old key get a full handshake, then resume under the new."""
    session = tmp_path / "session.pem"
    settings = tls_settings(certs, ticket_key_file=str(ticket_key))
    settings["tls"]["reload_interval_s"] = 0.05
    async with inbound_front(settings) as front:
        await handshake(front.address(), certs.ca_file, "-sess_out", str(session))
        replacement = tmp_path / "ticket.key.new"
        replacement.write_bytes(os.urandom(KEY_BYTES))
        replacement.replace(ticket_key)  # as a Kubernetes secret update swaps it
        await asyncio.sleep(0.2)
        assert await handshake(front.address(), certs.ca_file, "-sess_in", str(session)) == "New"
        await handshake(front.address(), certs.ca_file, "-sess_out", str(session))
        assert await handshake(front.address(), certs.ca_file, "-sess_in", str(session)) == (
            "Reused"
        )


async def test_the_workers_of_a_node_share_one_ticket_key(certs: TlsFiles, tmp_path: Path) -> None:
    """`serve --workers 2` with no key configured: the kernel spreads connections over both
    workers, and every one resumes (with a key each, about half would not)."""
    session = tmp_path / "session.pem"
    overrides = {
        "inbound": {"tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}}
    }
    async with LocalCluster(nodes=1, workers=2, overrides=overrides) as cluster:
        node = cluster.node_processes[0].smtp
        await handshake(node, certs.ca_file, "-sess_out", str(session))
        outcomes = [
            await handshake(node, certs.ca_file, "-sess_in", str(session)) for _ in range(12)
        ]
    assert outcomes == ["Reused"] * 12


def test_a_ticket_key_file_of_the_wrong_size_names_the_fix(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"k" * 48)
    with pytest.raises(TicketKeyError) as raised:
        read_key(str(short))
    assert str(raised.value) == (
        f"the TLS ticket key {short} has 48 bytes; it must have exactly 80 "
        f"(make one with: openssl rand 80 > {short})"
    )
    with pytest.raises(TicketKeyError, match=r"cannot read the TLS ticket key .*absent"):
        read_key(str(tmp_path / "absent"))


async def test_a_node_with_a_bad_ticket_key_does_not_start(certs: TlsFiles, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key\n")
    with pytest.raises(ConfigError, match=r"inbound\.tls: the TLS ticket key .* has 10 bytes"):
        async with inbound_front(tls_settings(certs, ticket_key_file=str(bad))):
            pass
