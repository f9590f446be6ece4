"""RelayClient's session and limit rules on scripted SMTP sessions and in-memory shared limits:
pooling, stale sessions, 421, addresses our client refuses, the cluster-wide limits."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib
import pytest

from smtpfleet.config import DeliveryConfig, RelayConfig
from smtpfleet.delivery.classify import FailureKind, Outcome
from smtpfleet.relays.pool import LIMIT_REACHED, RelayClient, SessionSettings
from smtpfleet.testing.memory import MemoryClusterStore, MemoryQueue

FAST = DeliveryConfig(connect_timeout_s=0.1, command_timeout_s=0.1, claim_idle_s=60)


@dataclass
class Session:
    """A scripted SMTP session: RCPT codes per recipient, one DATA code."""

    relay: Relay
    is_connected: bool = True
    messages: int = 0

    async def mail(self, sender: str) -> aiosmtplib.SMTPResponse:
        if "\r" in sender or "\n" in sender:
            raise ValueError("aiosmtplib refuses line breaks in addresses")
        self._alive()
        return aiosmtplib.SMTPResponse(250, "2.1.0 ok")

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse:
        if "\r" in recipient or "\n" in recipient:
            raise ValueError("aiosmtplib refuses line breaks in addresses")
        code = self.relay.rcpt_codes.get(recipient, 250)
        if code >= 400:
            raise aiosmtplib.SMTPRecipientRefused(code, "5.1.1 no", recipient)
        return aiosmtplib.SMTPResponse(code, "2.1.5 ok")

    async def data(self, message: bytes) -> aiosmtplib.SMTPResponse:
        self.messages += 1
        return aiosmtplib.SMTPResponse(self.relay.data_code, "queued")

    async def rset(self) -> aiosmtplib.SMTPResponse:
        if self.relay.rset_code != 250:  # aiosmtplib raises for any other answer
            raise aiosmtplib.SMTPResponseException(self.relay.rset_code, "need MAIL command")
        return aiosmtplib.SMTPResponse(250, "ok")

    async def quit(self) -> aiosmtplib.SMTPResponse:
        self.is_connected = False
        return aiosmtplib.SMTPResponse(221, "bye")

    def close(self) -> None:
        self.is_connected = False

    def _alive(self) -> None:
        if self.relay.drop_idle and self.messages:
            self.is_connected = False
            raise aiosmtplib.SMTPServerDisconnected("the relay closed the idle session")


@dataclass
class Relay:
    """What the scripted relay does; `sessions` are the ones our client opened."""

    rcpt_codes: dict[str, int] = field(default_factory=dict)
    data_code: int = 250
    refuse_connections: bool = False
    drop_idle: bool = False  # close a session after its first message, unnoticed
    rset_code: int = 250  # else: RSET gets a reply owed to an earlier command
    sessions: list[Session] = field(default_factory=list)

    async def connect(self, relay: RelayConfig) -> Session:
        if self.refuse_connections:
            raise ConnectionRefusedError(f"{relay.host}: connection refused")
        session = Session(self)
        self.sessions.append(session)
        return session


def client(relay: Relay, limits: MemoryClusterStore | None = None, **config: float) -> RelayClient:
    settings = SessionSettings(
        FAST, "mx.test", lease_ttl_s=5.0, limits=limits, owner="node-a", connect=relay.connect
    )
    return RelayClient(RelayConfig(name="relay-1", host="10.0.0.1", **config), settings)


async def send(c: RelayClient, recipients: Sequence[str] = ("a@x",), sender: str = "s@x") -> dict:
    return await c.send(sender, recipients, b"Subject: t\r\n\r\nbody\r\n")


@pytest.fixture
def limits() -> MemoryClusterStore:
    return MemoryClusterStore(MemoryQueue())


async def test_one_session_carries_many_messages() -> None:
    relay = Relay()
    c = client(relay)
    for _ in range(3):
        verdicts = await send(c)
        assert verdicts["a@x"].outcome is Outcome.DELIVERED

    assert len(relay.sessions) == 1
    assert relay.sessions[0].messages == 3


async def test_a_session_the_relay_closed_while_idle_is_replaced_at_once() -> None:
    relay = Relay(drop_idle=True)
    c = client(relay)
    await send(c)

    verdicts = await send(c)

    assert verdicts["a@x"].outcome is Outcome.DELIVERED  # not a connection error
    assert len(relay.sessions) == 2


async def test_a_421_closes_the_session() -> None:
    relay = Relay(data_code=421)
    c = client(relay)
    verdicts = await send(c)
    assert verdicts["a@x"].outcome is Outcome.TEMPORARY
    assert not relay.sessions[0].is_connected

    relay.data_code = 250
    await send(c)
    assert len(relay.sessions) == 2


async def test_each_recipient_gets_its_own_verdict() -> None:
    relay = Relay(rcpt_codes={"gone@x": 550})
    verdicts = await send(client(relay), ("a@x", "gone@x"))

    assert verdicts["a@x"].outcome is Outcome.DELIVERED
    assert verdicts["gone@x"].outcome is Outcome.PERMANENT


async def test_an_address_our_client_refuses_is_unsendable_and_keeps_the_session() -> None:
    relay = Relay()
    c = client(relay)

    verdicts = await send(c, ("bad\r\n@x", "a@x"))
    assert verdicts["bad\r\n@x"].kind is FailureKind.UNSENDABLE
    assert verdicts["a@x"].outcome is Outcome.DELIVERED
    verdicts = await send(c, ("a@x",), sender="s\n@x")
    assert verdicts["a@x"].kind is FailureKind.UNSENDABLE

    await send(c)
    assert len(relay.sessions) == 1


async def test_a_refused_connection_is_a_connection_verdict_and_frees_its_lease(
    limits: MemoryClusterStore,
) -> None:
    relay = Relay(refuse_connections=True)

    verdicts = await send(client(relay, limits))

    assert verdicts["a@x"].kind is FailureKind.CONNECTION
    assert limits.connections["relay-1"] == {}


async def test_all_connection_leases_held_elsewhere_is_a_limit_not_relay_trouble(
    limits: MemoryClusterStore,
) -> None:
    limits.connections["relay-1"] = {"node-b:0": 2**62}

    verdicts = await send(client(relay := Relay(), limits, max_connections=1))

    assert verdicts["a@x"] == LIMIT_REACHED
    assert relay.sessions == []


async def test_an_open_session_holds_one_lease_until_it_is_closed(
    limits: MemoryClusterStore,
) -> None:
    c = client(Relay(), limits)
    await send(c)
    await send(c)
    assert len(limits.connections["relay-1"]) == 1

    await c.close()
    assert limits.connections["relay-1"] == {}


async def test_the_cluster_wide_message_budget_holds_messages_back(
    limits: MemoryClusterStore,
) -> None:
    relay = Relay()
    now = int(time.time())
    for second in range(now, now + 3):  # other nodes spent this second's budget and the next
        limits.rate[("relay-1", second)] = 1

    verdicts = await send(client(relay, limits, max_messages_per_s=1))

    assert verdicts["a@x"] == LIMIT_REACHED
    assert relay.sessions == []


async def test_limits_that_cannot_be_read_fail_open(limits: MemoryClusterStore) -> None:
    limits.limits_unavailable = True
    relay = Relay()

    verdicts = await send(client(relay, limits, max_messages_per_s=5))

    assert verdicts["a@x"].outcome is Outcome.DELIVERED


async def test_a_session_whose_rset_is_not_answered_250_is_closed() -> None:
    """A reply other than 250 to RSET is one owed to an earlier command, read late: the
    session is a reply behind, and the next message must not get its replies one off."""
    relay = Relay(rcpt_codes={"gone@x": 550}, rset_code=503)
    c = client(relay)
    verdicts = await send(c, ["gone@x"])  # every recipient refused: RSET, answered 503
    assert verdicts["gone@x"].code == 550
    assert not relay.sessions[0].is_connected
    assert (await send(c))["a@x"].outcome is Outcome.DELIVERED
    assert len(relay.sessions) == 2
