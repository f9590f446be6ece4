"""Outbound TLS and AUTH against real relays on loopback, with a CA each test makes (trustme).

opportunistic: STARTTLS when the relay offers it, plain when not; required + verify against
the relay's CA bundle; a relay whose certificate does not verify is unhealthy, with the reason
in `smtpfleet status`, and its mail waits; the health check exports the certificate's days
left; AUTH after STARTTLS with right and wrong credentials (wrong ones are relay trouble).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from smtpfleet.config import Config
from smtpfleet.node import Node
from smtpfleet.testing import eventually, node_config, run_cli, running_node, send
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.timeout(120)  # above the sum of its bounded waits

RELAY_TLS = "smtpfleet_relay_tls_handshakes_total"
EXPIRY = "smtpfleet_relay_certificate_expiry_days"
CREDENTIALS = ("relayuser", "s3cret")


@pytest.fixture
def certs(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "relay-tls")


@pytest.fixture
async def tls_sink(certs: TlsFiles) -> AsyncIterator[Sink]:
    async with Sink(name="tls-relay", tls=certs.server_context()) as relay:
        yield relay


def relay_config(redis_url: str, prefix: str, sink: Sink, **relay: Any) -> Config:
    """A node with one relay, `sink`, under the given relay settings."""
    settings = {"name": "relay-1", "host": sink.host, "port": sink.port, **relay}
    overrides = {
        "redis": {"prefix": prefix},
        "relays": [settings],
        "retry": {"initial_s": 3600, "max_s": 3600},
    }
    return node_config(redis_url, [sink.address], overrides)


def cli_env(prefix: str) -> dict[str, str]:
    return {"SMTPFLEET_REDIS__PREFIX": prefix, "SMTPFLEET_REDIS__SHARDS": "4"}


def sample(node: Node, name: str, **labels: str) -> float:
    return node.registry.get_sample_value(name, labels) or 0.0


async def deliver_one(node: Node, sink: Sink) -> None:
    reply = await send(node.inbound.addresses[0])
    assert reply.code == 250, reply
    await sink.wait_for(1)


@pytest.mark.parametrize("offered", [True, False], ids=["starttls-offered", "plain-relay"])
async def test_opportunistic_uses_starttls_only_when_offered(
    redis_url: str, prefix: str, certs: TlsFiles, offered: bool
) -> None:
    async with Sink(tls=certs.server_context() if offered else None) as relay:
        config = relay_config(
            redis_url, prefix, relay, tls="opportunistic", tls_ca_file=str(certs.ca_file)
        )
        async with running_node(config) as node:
            await deliver_one(node, relay)
            handshakes = sample(node, RELAY_TLS, relay="relay-1", result="ok", version="TLSv1.3")
    (message,) = relay.messages
    assert message.tls_version == ("TLSv1.3" if offered else None)
    assert (handshakes >= 1) is offered


async def test_required_and_verified_delivers_over_tls_and_exports_expiry(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(days=10, hours=6)
    certs = make_tls_files(tmp_path / "short", not_after=not_after)
    async with Sink(tls=certs.server_context(), require_tls=True) as relay:
        config = relay_config(
            redis_url, prefix, relay, tls="required", tls_ca_file=str(certs.ca_file)
        )
        async with running_node(config) as node:
            await deliver_one(node, relay)
            await eventually(lambda: sample(node, EXPIRY, relay="relay-1") > 0)
            expected = (not_after - datetime.now(UTC)).total_seconds() / 86400
            assert sample(node, EXPIRY, relay="relay-1") == pytest.approx(expected, abs=0.01)
            assert sample(node, RELAY_TLS, relay="relay-1", result="ok", version="TLSv1.3") >= 2
            assert sample(node, RELAY_TLS, relay="relay-1", result="failed", version="none") == 0
    (message,) = relay.messages
    assert message.tls_version == "TLSv1.3"


async def test_unverifiable_certificate_makes_relay_unhealthy_and_mail_waits(
    redis_url: str, prefix: str, tls_sink: Sink, tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other-ca")  # a CA that never signed the relay's cert
    config = relay_config(
        redis_url, prefix, tls_sink, tls="required", tls_ca_file=str(stranger.ca_file)
    )
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0])
        assert reply.code == 250
        await eventually(lambda: "relay-1" not in node.health.healthy)

        async def waiting() -> bool:
            stats = await node.queue.stats(10**13)
            return bool(stats["retry"] + stats["ready"] >= 1 and stats["dead"] == 0)

        await eventually(waiting)
        code, out, err = await run_cli(
            "status", "--redis", redis_url, "--json", env=cli_env(prefix)
        )
        assert code == 0, err
        (row,) = json.loads(out)["relays"]
        assert row["verdict"] == "down"
        (reason,) = row["reasons"].values()
        assert reason.startswith("certificate verify failed: "), reason
        code, table, _ = await run_cli("status", "--redis", redis_url, env=cli_env(prefix))
        assert "certificate verify failed" in table
        assert sample(node, RELAY_TLS, relay="relay-1", result="failed", version="none") >= 1
        assert sample(node, EXPIRY, relay="relay-1") == 0
        assert sample(node, "smtpfleet_bounces_total") == 0
    assert tls_sink.count == 0


@pytest.mark.parametrize("right", [True, False], ids=["right-credentials", "wrong-credentials"])
async def test_auth_after_starttls(
    redis_url: str, prefix: str, certs: TlsFiles, right: bool
) -> None:
    async with Sink(tls=certs.server_context(), credentials=CREDENTIALS) as relay:
        password = CREDENTIALS[1] if right else "wrong"
        config = relay_config(
            redis_url,
            prefix,
            relay,
            tls="required",
            tls_ca_file=str(certs.ca_file),
            username=CREDENTIALS[0],
            password=password,
        )
        async with running_node(config) as node:
            reply = await send(node.inbound.addresses[0])
            assert reply.code == 250
            if right:
                await relay.wait_for(1)
                assert relay.messages[0].login == CREDENTIALS[0]
                assert relay.messages[0].tls_version == "TLSv1.3"
                return

            async def retried() -> bool:
                stats = await node.queue.stats(10**13)
                return bool(stats["retry"] == 1 and stats["dead"] == 0)

            await eventually(retried)
            assert relay.auth_failures >= 1
            assert relay.count == 0
            assert sample(node, "smtpfleet_bounces_total") == 0
            outcomes = sample(
                node, "smtpfleet_deliveries_total", relay="relay-1", outcome="connection_error"
            )
            assert outcomes >= 1
