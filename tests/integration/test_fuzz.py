"""Hostile sessions against a real node: the invariants of issue 16, a few seconds' worth.

The same generator runs for minutes in `loadtest/fuzz.py`; a failure there replays here by
seed. MX mode (no relay networks), as an anonymous client on the internet would find it.
"""

from __future__ import annotations

import collections
import json
import os
import time

import pytest
import uvloop

from smtpfleet.inbound.tls import HANDSHAKE_TIMEOUT_S
from smtpfleet.testing import eventually, send
from smtpfleet.testing.fuzz import (
    REPLY_TIMEOUT_S,
    Driver,
    Findings,
    Generator,
    Session,
    open_connections,
    tokens_in,
)
from smtpfleet.testing.localcluster import LocalCluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

SEED = int(os.environ.get("SMTPFLEET_FUZZ_SEED", "20261128"))
SESSIONS = 150
# The per-client rate limits have tests of their own: here every session comes from one
# loopback address, which would meet them within the first minute. Its sessions are counted
# (through Redis, before the banner), with a cap it never meets.
NO_CLIENT_LIMITS = {"sessions": 1000, "messages_per_minute": 0, "recipients_per_minute": 0}
MX_MODE = {
    "inbound": {
        "relay_networks": [],
        "accepted_domains": ["example.net"],
        "limits": NO_CLIENT_LIMITS,
    }
}


async def test_hostile_sessions_keep_every_invariant() -> None:
    async with LocalCluster(nodes=1, sinks=1, overrides=MX_MODE) as cluster:
        node, sink = cluster.node_processes[0], cluster.sink_servers[0]
        generator = Generator(SEED)
        sessions = [generator.session(n) for n in range(SESSIONS)]
        findings = await Driver(node.smtp).run(sessions, concurrency=10)

        assert not findings.violations, findings.violations[:10]
        assert findings.sessions == SESSIONS
        # Every session ended: the node keeps none of their connections open (those that left
        # before the banner were kept half open for good).
        assert any(s.leave_before_banner for s in sessions)
        await eventually(lambda: open_connections(node.smtp[1]) == 0, timeout_s=10)
        # A positive control: the generator does produce both outcomes.
        assert len(findings.acknowledged) >= 20, findings
        assert len(findings.refused) >= 20, findings

        def delivered() -> collections.Counter[str]:
            return collections.Counter(t for m in sink.messages for t in tokens_in(m.data))

        # Everything acknowledged arrives (delivered, or bounced with its headers quoted).
        await eventually(lambda: findings.acknowledged <= set(delivered()), timeout_s=30)
        # Nothing refused is ever delivered (the messages above went through the same queue,
        # so a refused one would have arrived with them).
        assert not findings.refused & set(delivered())
        # The node still answers a plain transaction.
        assert (await send(node.smtp, recipients=["after@example.net"])).code == 250
        await eventually(lambda: any("after@example.net" in m.recipients for m in sink.messages))
        errors = [
            line
            for line in node.log_path.read_text(errors="replace").splitlines()
            if line.startswith("{") and json.loads(line).get("level") in ("error", "critical")
        ]
        assert not errors, errors[:5]


async def test_a_session_left_in_its_tls_handshake_is_closed_by_the_node_not_a_hang() -> None:
    """Seed 16016, session 1208 (found by `loadtest/fuzz.py`): STARTTLS, `220`, then an empty
    line, two bytes where a TLS record header has five. The node reads on until its handshake
    timeout and closes the connection; the driver waited as long, and in one run of three its
    own timer fired first and reported a hang."""
    session = Generator(16016).session(1208)
    starttls = session.groups.index([b"STARTTLS"])
    assert session.groups[starttls + 1] == [b""]
    assert REPLY_TIMEOUT_S > HANDSHAKE_TIMEOUT_S
    async with LocalCluster(nodes=1, overrides=MX_MODE) as cluster:
        started = time.monotonic()
        findings = await Driver(cluster.node_processes[0].smtp).one(session)
        waited = time.monotonic() - started

    assert not findings.violations, findings.violations
    # The node ended the session itself, once the handshake timed out.
    assert HANDSHAKE_TIMEOUT_S <= waited < REPLY_TIMEOUT_S


def test_a_slow_writer_stops_when_the_node_closes_under_uvloop() -> None:
    """`loadtest/fuzz.py` runs on uvloop, which raises on a write to a closed transport: a
    slow session still writing after the node's 221 ended a whole fuzz run with a traceback."""
    session = Session(number=0, groups=[[b"QUIT", b"NOOP " + b"x" * 300]], slow=True)

    async def run() -> Findings:
        async with LocalCluster(nodes=1, overrides=MX_MODE) as cluster:
            return await Driver(cluster.node_processes[0].smtp).one(session)

    findings = uvloop.run(run())
    assert findings.sessions == 1
    assert not findings.violations, findings.violations
    # The banner; the 221 too unless the node's reset (our bytes after its close) overtook it.
    assert findings.replies >= 1
