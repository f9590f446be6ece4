"""Tenant routing end to end (issue #14): a rule's `tenants` match the authenticated user, or
the tenant header of a trusted (`relay_networks`) client, and nobody else's header."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import argon2
import pytest

from smtpfleet.config import Config
from smtpfleet.testing import domain_routed_first_to, eventually, node_config, running_node
from smtpfleet.testing.client import make_message, send
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.timeout(60)

TENANT, PASSWORD = "acme", "tenant password"
HEADER = "X-Tenant"


def routed(redis_url: str, prefix: str, sink: Sink, sink_b: Sink, **inbound: Any) -> Config:
    """relay-1 serves tenant acme only by its tag; everyone else is hashed over both."""
    return node_config(
        redis_url,
        [],
        {
            "redis": {"prefix": prefix},
            "relays": [
                {"name": "relay-1", "host": sink.host, "port": sink.port, "tags": ["acme"]},
                {"name": "relay-2", "host": sink_b.host, "port": sink_b.port},
            ],
            "routing": {
                "tenant_header": HEADER,
                "rules": [{"name": "acme", "tenants": [TENANT], "relays": {"tags": "acme"}}],
            },
            "inbound": inbound,
        },
    )


def with_header(sender: str, recipient: str) -> bytes:
    message = make_message(sender=sender, recipients=[recipient])
    return f"{HEADER}: {TENANT}\r\n".encode() + message


async def test_a_trusted_clients_tenant_header_picks_the_tenants_relays(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink
) -> None:
    config = routed(redis_url, prefix, sink, sink_b)
    # Hashed alone, this domain's mail goes to relay-2 first: only the rule sends it to relay-1.
    recipient = f"r@{domain_routed_first_to(config, 'relay-2')}"
    async with running_node(config) as node:
        address = node.inbound.addresses[0]
        data = with_header("t@a.example", recipient)
        tagged = await send(address, sender="t@a.example", recipients=[recipient], data=data)
        plain = await send(address, sender="p@a.example", recipients=[recipient])
        assert (tagged.code, plain.code) == (250, 250)
        await eventually(lambda: sink.count + sink_b.count == 2, timeout_s=10)
        assert [m.sender for m in sink.messages] == ["t@a.example"]
        assert [m.sender for m in sink_b.messages] == ["p@a.example"]


async def test_a_strangers_tenant_header_is_ignored(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink
) -> None:
    config = routed(redis_url, prefix, sink, sink_b, relay_networks=[])
    domain = domain_routed_first_to(config, "relay-2")
    config = routed(redis_url, prefix, sink, sink_b, relay_networks=[], accepted_domains=[domain])
    recipient = f"r@{domain}"
    async with running_node(config) as node:
        data = with_header("s@stranger.example", recipient)
        address = node.inbound.addresses[0]
        reply = await send(address, sender="s@stranger.example", recipients=[recipient], data=data)
        assert reply.code == 250
        await eventually(lambda: sink_b.count == 1, timeout_s=10)
        assert sink.count == 0  # the header named acme; the stranger gets no tenant


def submit(address: tuple[str, int], certs: TlsFiles, recipient: str) -> None:
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.login(TENANT, PASSWORD)
        client.sendmail("u@a.example", [recipient], make_message(recipients=[recipient]))


async def test_the_authenticated_user_is_the_tenant(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink, tmp_path: Path
) -> None:
    certs = make_tls_files(tmp_path / "tls")
    users = tmp_path / "users"
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    users.write_text(f"{TENANT}:{hasher.hash(PASSWORD)}\n")
    config = routed(
        redis_url,
        prefix,
        sink,
        sink_b,
        relay_networks=[],  # no trusted network: only the login can name the tenant
        listeners=[{"address": "127.0.0.1:0", "profile": "submission"}],
        tls={"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
        auth={"users_file": str(users)},
    )
    recipient = f"r@{domain_routed_first_to(config, 'relay-2', suffix='foreign.example')}"
    async with running_node(config) as node:
        submission = node.inbound.addresses[-1]
        await asyncio.to_thread(submit, submission, certs, recipient)
        await eventually(lambda: sink.count == 1, timeout_s=10)
        assert sink.messages[0].sender == "u@a.example"
        assert sink_b.count == 0
