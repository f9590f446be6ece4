"""Pipelining across messages (RFC 2920 §3.1, the message content as the first "command" of a
group), against a real aiosmtpd relay: a message waiting for a session has its envelope
written with the body of the message before it, so a session busy back to back costs one
write and one round trip per message instead of two. Every recipient keeps its own verdict,
and a waiting message never loses its place or its mail when the session under it breaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from smtpfleet.config import DeliveryConfig, RelayConfig
from smtpfleet.delivery.classify import Outcome, Verdict
from smtpfleet.relays.pool import RelayClient, SessionSettings
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)

BODY = b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n"


@pytest.fixture
async def relay() -> AsyncIterator[Sink]:
    async with Sink(name="chaining", pipelining=True) as sink:
        yield sink


class Chained(list[str]):
    """The relay names `on_chained` reported; `seen` is set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def __call__(self, relay: str) -> None:
        self.append(relay)
        self.seen.set()


def client_for(
    sink: Sink, chained: Chained, *, connections: int = 1, per_s: float = 0.0
) -> RelayClient:
    config = DeliveryConfig(connect_timeout_s=2.0, command_timeout_s=2.0)
    relay = RelayConfig(
        name=sink.name,
        host=sink.host,
        port=sink.port,
        max_connections=connections,
        max_messages_per_s=per_s,
    )
    settings = SessionSettings(config, "mx.test", lease_ttl_s=5.0, on_chained=chained)
    return RelayClient(relay, settings)


def envelopes(count: int) -> list[tuple[str, Sequence[str]]]:
    return [
        (f"s{n}@example.com", [f"r{n}a@example.net", f"r{n}b@example.net"]) for n in range(count)
    ]


async def send_all(
    client: RelayClient, batch: list[tuple[str, Sequence[str]]]
) -> list[dict[str, Verdict]]:
    """All at once: the first takes the session, the others wait at the relay's slot gate."""
    return await asyncio.gather(*(client.send(s, r, BODY) for s, r in batch))


def all_delivered(results: Sequence[dict[str, Verdict]]) -> bool:
    return all(v.outcome is Outcome.DELIVERED for r in results for v in r.values())


async def test_messages_waiting_for_a_session_ride_on_the_one_before(relay: Sink) -> None:
    chained = Chained()
    client = client_for(relay, chained)
    batch = envelopes(10)
    results = await send_all(client, batch)
    assert all_delivered(results)
    await relay.wait_for(10)
    # One session; EHLO, the first envelope, then each body carrying the next envelope:
    # 12 reads where one write per envelope and one per body took 21.
    assert relay.connections == 1
    assert relay.reads <= 12
    assert chained == ["chaining"] * 9
    got = sorted((m.sender, m.recipients, m.data) for m in relay.messages)
    assert got == sorted((s, tuple(r), BODY) for s, r in batch)  # each once, exact bytes
    await client.close()


async def test_every_recipient_keeps_its_own_verdict_when_chained(relay: Sink) -> None:
    relay.faults.rcpt_replies = {
        "r1b@example.net": "550 5.1.1 no such user",
        "r2a@example.net": "452 4.5.3 too many recipients",
    }
    relay.faults.data_replies = ["554 5.6.0 content refused"]  # the first message's final dot
    chained = Chained()
    client = client_for(relay, chained)
    first, second, third = await send_all(client, envelopes(3))
    assert chained == ["chaining", "chaining"]
    assert {(v.outcome, v.code) for v in first.values()} == {(Outcome.PERMANENT, 554)}
    assert second["r1a@example.net"].outcome is Outcome.DELIVERED
    assert (second["r1b@example.net"].outcome, second["r1b@example.net"].code) == (
        Outcome.PERMANENT,
        550,
    )
    assert (third["r2a@example.net"].outcome, third["r2a@example.net"].code) == (
        Outcome.TEMPORARY,
        452,
    )
    assert third["r2b@example.net"].outcome is Outcome.DELIVERED
    await relay.wait_for(2)
    assert sorted(m.recipients for m in relay.messages) == [
        ("r1a@example.net",),
        ("r2b@example.net",),
    ]
    assert relay.connections == 1
    await client.close()


async def test_a_chained_message_whose_recipients_are_all_refused_leaves_the_session_in_step(
    relay: Sink,
) -> None:
    relay.faults.rcpt_replies = {
        "r1a@example.net": "550 5.1.1 no such user",
        "r1b@example.net": "550 5.1.1 no such user",
    }
    chained = Chained()
    client = client_for(relay, chained)
    results = await send_all(client, envelopes(3))
    assert {v.code for v in results[1].values()} == {550}
    assert all_delivered([results[0], results[2]])
    await relay.wait_for(2)
    assert relay.connections == 1  # reset after the refusals, then the third message
    await client.close()


async def test_a_session_that_breaks_under_a_carried_envelope_sends_it_on_a_new_one(
    relay: Sink,
) -> None:
    """The relay answers each message, then hangs up: every carried envelope is lost with its
    session before its body went, so each waiting message goes on a new session, once."""
    relay.faults.close_after_data = True
    chained = Chained()
    client = client_for(relay, chained)
    batch = envelopes(3)
    results = await send_all(client, batch)
    assert all_delivered(results)
    await relay.wait_for(3)
    assert sorted(m.sender for m in relay.messages) == sorted(s for s, _ in batch)
    assert len(relay.messages) == 3  # nothing twice
    assert relay.connections == 3
    assert len(chained) >= 1  # the envelopes did ride, and were lost with their sessions
    await client.close()


async def test_a_waiting_message_cancelled_after_its_envelope_went_is_never_sent(
    relay: Sink,
) -> None:
    """Cancelled between its envelope (carried with the message before) and its body: the
    relay is left waiting for a body, so the session is closed without a word; a QUIT or a
    final dot would be taken as the message's text or end it, empty."""
    relay.faults.delay_s = 0.1  # the carrying message's final reply takes a while
    chained = Chained()
    client = client_for(relay, chained)
    first = asyncio.create_task(client.send("first@example.com", ["a@example.net"], BODY))
    await asyncio.sleep(0.05)  # the first holds the session
    waiting = asyncio.create_task(client.send("gone@example.com", ["b@example.net"], BODY))
    await asyncio.wait_for(chained.seen.wait(), 5.0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    verdicts = await first
    assert verdicts["a@example.net"].outcome is Outcome.DELIVERED
    relay.faults.delay_s = 0.0
    later = await client.send("later@example.com", ["c@example.net"], BODY)  # the slot is back
    assert later["c@example.net"].outcome is Outcome.DELIVERED
    await relay.wait_for(2)
    assert [m.sender for m in relay.messages] == ["first@example.com", "later@example.com"]
    assert relay.rejected == []
    assert relay.connections == 2  # the session the cancelled message held was closed
    await client.close()


async def test_no_chaining_without_pipelining_or_under_a_per_second_budget() -> None:
    async with Sink(name="plain") as plain, Sink(name="budget", pipelining=True) as budget:
        chained = Chained()
        for client in (client_for(plain, chained), client_for(budget, chained, per_s=1000.0)):
            results = await send_all(client, envelopes(4))
            assert all_delivered(results)
            await client.close()
        assert chained == []
        assert (plain.count, budget.count) == (4, 4)
        assert budget.reads == 1 + 4 * 2 + 1  # EHLO, an envelope and a body a message, QUIT


async def test_a_stray_reply_never_becomes_a_chained_messages_verdict(relay: Sink) -> None:
    """A relay that answers a final dot twice: the stray `550` arrives where the carried
    envelope's MAIL reply belongs, and every reply after it is one off. Such replies cannot be
    that envelope's (its DATA answered 250, or refused after an accepted RCPT): the waiting
    message goes on another session, and no recipient is refused that the relay accepted."""
    relay.faults.data_replies = ["250 2.0.0 first\r\n550 5.1.1 stray refusal"]
    # Each reply in a segment of its own: the carried envelope's last one (its 354) arrives
    # after its DATA's place was filled, so nothing is left over to show the shift.
    relay.faults.delay_s = 0.02
    chained = Chained()
    client = client_for(relay, chained)
    batch = envelopes(3)
    results = await send_all(client, batch)
    assert chained  # the second message's envelope did ride on the first's body
    assert all_delivered(results)
    await relay.wait_for(3)
    assert sorted(m.sender for m in relay.messages) == sorted(s for s, _ in batch)
    assert relay.connections == 2  # the out-of-step session was closed
    await client.close()
