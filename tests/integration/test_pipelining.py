"""Outbound PIPELINING (RFC 2920) against a real aiosmtpd relay: the envelope in one write,
exact per-recipient verdicts for every refusal, and step by step for relays that do not
advertise it. Writes are counted as reads at the relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from smtpfleet.config import DeliveryConfig, RelayConfig
from smtpfleet.delivery.classify import FailureKind, Outcome, Verdict
from smtpfleet.relays.pool import RelayClient, SessionSettings
from smtpfleet.testing.sink import Sink

BODY = b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n"
RCPTS = ("a@example.net", "b@example.net", "c@example.net")


@pytest.fixture
async def relay() -> AsyncIterator[Sink]:
    async with Sink(name="pipelining", pipelining=True) as sink:
        yield sink


def client_for(sink: Sink) -> RelayClient:
    config = DeliveryConfig(connect_timeout_s=2.0, command_timeout_s=2.0)
    relay = RelayConfig(name=sink.name, host=sink.host, port=sink.port)
    return RelayClient(relay, SessionSettings(config, "mx.test", lease_ttl_s=5.0))


async def send_counting(
    client: RelayClient,
    sink: Sink,
    recipients: Sequence[str] = RCPTS,
    sender: str = "s@example.com",
) -> tuple[dict[str, Verdict], int]:
    """Verdicts, and the reads the relay made for them (on a session already open)."""
    before = sink.reads
    verdicts = await client.send(sender, recipients, BODY)
    return verdicts, sink.reads - before


async def warm(client: RelayClient, sink: Sink) -> None:
    verdicts = await client.send("s@example.com", ["warm@example.net"], BODY)
    assert verdicts["warm@example.net"].outcome is Outcome.DELIVERED
    await sink.wait_for(1)


async def test_the_envelope_goes_in_one_write_and_the_message_in_another(relay: Sink) -> None:
    client = client_for(relay)
    await warm(client, relay)
    verdicts, reads = await send_counting(client, relay)
    assert reads == 2  # MAIL + 3 RCPT + DATA, then the message
    assert {v.outcome for v in verdicts.values()} == {Outcome.DELIVERED}
    message = relay.messages[-1]
    assert message.recipients == RCPTS
    assert message.data == BODY  # dot-stuffing undone by the relay: the bytes we sent
    assert relay.connections == 1
    await client.close()


async def test_a_fresh_session_pipelines_its_first_message(relay: Sink) -> None:
    client = client_for(relay)
    verdicts = await client.send("s@example.com", RCPTS, BODY)
    assert {v.outcome for v in verdicts.values()} == {Outcome.DELIVERED}
    assert relay.reads == 3  # EHLO, the envelope, the message
    await client.close()


async def test_a_refused_recipient_gets_its_own_verdict(relay: Sink) -> None:
    relay.faults.rcpt_replies = {
        "b@example.net": "550 5.1.1 no such user",
        "c@example.net": "452 4.5.3 too many recipients",
    }
    client = client_for(relay)
    await warm(client, relay)
    verdicts, reads = await send_counting(client, relay)
    assert reads == 2
    assert verdicts["a@example.net"].outcome is Outcome.DELIVERED
    assert (verdicts["b@example.net"].outcome, verdicts["b@example.net"].code) == (
        Outcome.PERMANENT,
        550,
    )
    assert verdicts["c@example.net"].outcome is Outcome.TEMPORARY
    assert verdicts["c@example.net"].code == 452
    assert relay.messages[-1].recipients == ("a@example.net",)
    await client.close()


async def test_all_recipients_refused_consumes_the_data_refusal_and_resets(relay: Sink) -> None:
    relay.faults.rcpt_replies = dict.fromkeys(RCPTS, "550 5.1.1 no such user")
    client = client_for(relay)
    await warm(client, relay)
    verdicts, _ = await send_counting(client, relay)
    assert {(v.outcome, v.code) for v in verdicts.values()} == {(Outcome.PERMANENT, 550)}
    assert relay.count == 1  # only the warm-up message
    # The session is still in step: the next message on it gets its own replies.
    relay.faults.rcpt_replies = {}
    verdicts, _ = await send_counting(client, relay)
    assert {v.outcome for v in verdicts.values()} == {Outcome.DELIVERED}
    assert relay.connections == 1
    await client.close()


async def test_a_refused_mail_is_every_recipients_verdict(relay: Sink) -> None:
    client = client_for(relay)
    await warm(client, relay)
    relay.faults.mail_reply = "451 4.7.1 try later"
    verdicts, reads = await send_counting(client, relay)
    assert reads == 2  # the envelope, then RSET after the refused MAIL/RCPT/DATA replies
    assert {(v.outcome, v.code) for v in verdicts.values()} == {(Outcome.TEMPORARY, 451)}
    relay.faults.mail_reply = None
    verdicts, _ = await send_counting(client, relay)
    assert {v.outcome for v in verdicts.values()} == {Outcome.DELIVERED}
    assert relay.connections == 1
    await client.close()


async def test_a_refusal_at_the_final_dot_is_every_accepted_recipients(relay: Sink) -> None:
    relay.faults.rcpt_replies = {"c@example.net": "550 5.1.1 no such user"}
    client = client_for(relay)
    await warm(client, relay)
    relay.faults.data_replies = ["554 5.6.0 content refused"]
    verdicts, _ = await send_counting(client, relay)
    assert (verdicts["a@example.net"].code, verdicts["b@example.net"].code) == (554, 554)
    assert verdicts["c@example.net"].code == 550
    assert len(relay.rejected) == 1
    await client.close()


async def test_addresses_our_client_refuses_stay_unsendable(relay: Sink) -> None:
    client = client_for(relay)
    await warm(client, relay)
    verdicts, _ = await send_counting(client, relay, ["a@example.net", "b\x00@example.net"])
    assert verdicts["a@example.net"].outcome is Outcome.DELIVERED
    assert verdicts["b\x00@example.net"].kind is FailureKind.UNSENDABLE
    assert relay.messages[-1].recipients == ("a@example.net",)
    verdicts, reads = await send_counting(client, relay, sender="s\x00@example.com")
    assert reads == 0  # nothing written
    assert {v.kind for v in verdicts.values()} == {FailureKind.UNSENDABLE}
    assert relay.connections == 1
    await client.close()


async def test_a_relay_without_pipelining_gets_the_envelope_step_by_step() -> None:
    async with Sink(name="plain") as relay:
        client = client_for(relay)
        await warm(client, relay)
        relay.faults.rcpt_replies = {"b@example.net": "550 5.1.1 no such user"}
        verdicts, reads = await send_counting(client, relay)
        assert reads == 6  # MAIL, 3 RCPT, DATA, the message
        assert verdicts["a@example.net"].outcome is Outcome.DELIVERED
        assert verdicts["b@example.net"].code == 550
        assert relay.messages[-1].recipients == ("a@example.net", "c@example.net")
        await client.close()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "step-by-step"])
async def test_any_2xx_to_mail_or_rcpt_is_a_yes_and_the_message_goes(pipelined: bool) -> None:
    """RFC 5321 §4.2.1: 2xx is a yes. aiosmtplib takes only 250 to MAIL and 250/251 to RCPT:
    a `252` became a refusal whose code read as "delivered", and nothing was sent."""
    async with Sink(name="two-five-two", pipelining=pipelined) as relay:
        client = client_for(relay)
        relay.faults.mail_reply = "252 2.1.0 Sender ok, unverified"
        relay.faults.rcpt_replies = dict.fromkeys(RCPTS, "252 2.1.5 Cannot VRFY, will accept")
        verdicts = await client.send("s@example.com", RCPTS, BODY)
        assert {v.outcome for v in verdicts.values()} == {Outcome.DELIVERED}
        assert {v.code for v in verdicts.values()} == {250}  # the final dot's reply
        await relay.wait_for(1)
        assert relay.messages[-1].recipients == RCPTS
        await client.close()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "step-by-step"])
async def test_replies_left_over_are_never_the_next_messages(pipelined: bool) -> None:
    """A relay that answers a final dot twice, in one segment: the second reply was read as
    the next message's on the same session, and its `550` bounced a recipient the relay never
    refused. Such a session is closed instead of reused."""
    async with Sink(name="twice", pipelining=pipelined) as relay:
        client = client_for(relay)
        relay.faults.data_replies = ["250 2.0.0 first\r\n550 5.1.1 stray refusal"]
        first = await client.send("s@example.com", RCPTS, BODY)
        assert {v.text for v in first.values()} == {"250 2.0.0 first"}
        second = await client.send("s@example.com", RCPTS, BODY)
        assert {v.outcome for v in second.values()} == {Outcome.DELIVERED}
        assert relay.refused_recipients == []
        await relay.wait_for(2)
        assert relay.connections == 2
        await client.close()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "step-by-step"])
async def test_a_session_lost_after_the_final_dot_is_not_sent_again_at_once(
    pipelined: bool,
) -> None:
    """The relay stored the message and the session broke before its reply. A reused session
    that breaks is retried on a fresh one at once (the relay closed it while idle), but not
    this one: the message went out again and was stored twice, reported delivered (the relay
    fuzzer found it). It is a temporary failure; the worker's retry decides what follows."""
    async with Sink(name="lost", pipelining=pipelined) as relay:
        client = client_for(relay)
        await warm(client, relay)  # the next message goes on a reused session
        relay.faults.lose_data_reply = True
        verdicts = await client.send("s@example.com", RCPTS, BODY)
        assert {v.outcome for v in verdicts.values()} == {Outcome.TEMPORARY}
        assert {v.kind for v in verdicts.values()} == {FailureKind.CONNECTION}
        await relay.wait_for(2)
        stored = [m for m in relay.messages if m.recipients == RCPTS]
        assert len(stored) == 1
        assert relay.connections == 1  # no second session for it
        await client.close()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "step-by-step"])
@pytest.mark.parametrize("fault", ["lose_data_reply", "silence_after_data"])
async def test_no_reply_to_the_final_dot_is_reported_as_possibly_stored(
    pipelined: bool, fault: str
) -> None:
    """The relay stored the message and then dropped the session, or went silent: the hook
    behind `smtpfleet_relay_replies_lost_total` hears of it once, the verdict stays temporary
    (a lost session, or a timeout), and nothing is sent again at once."""
    async with Sink(name="lossy", pipelining=pipelined) as relay:
        lost: list[str] = []
        config = DeliveryConfig(connect_timeout_s=2.0, command_timeout_s=0.5)
        settings = SessionSettings(config, "mx.test", lease_ttl_s=5.0, on_reply_lost=lost.append)
        client = RelayClient(RelayConfig(name="lossy", host=relay.host, port=relay.port), settings)
        setattr(relay.faults, fault, True)
        verdicts = await client.send("s@example.com", RCPTS, BODY)
        kind = FailureKind.CONNECTION if fault == "lose_data_reply" else FailureKind.TIMEOUT
        assert {(v.outcome, v.kind) for v in verdicts.values()} == {(Outcome.TEMPORARY, kind)}
        assert lost == ["lossy"]
        assert (relay.count, relay.connections) == (1, 1)
        relay.faults.blackhole = False
        await client.close()


async def test_a_send_cancelled_mid_transaction_is_closed_before_close_returns() -> None:
    """A cancelled delivery's session is closed in the background (QUIT, bounded); `close()`
    waits for it. It ran shielded and untracked: cancelled again (as a stopping node cancels
    every task), the send returned at once, `close()` did not wait, and the loop could end
    with the socket open."""
    async with Sink(name="cut", pipelining=True) as relay:
        client = client_for(relay)
        await warm(client, relay)
        relay.faults.blackhole = True  # silent: the send hangs mid-transaction, QUIT too
        send = asyncio.ensure_future(client.send("s@example.com", RCPTS, BODY))
        await asyncio.sleep(0.2)
        send.cancel()
        await asyncio.sleep(0.05)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        await client.close()  # waits out the unanswered QUIT, then closes
        await asyncio.sleep(0.2)  # the relay's side of the close
        assert relay.open_sessions == 0


async def test_a_close_cut_short_still_closes_every_session() -> None:
    """`close()` says QUIT to each idle session and waits (bounded) for the answer; cancelled
    meanwhile (a node stopping on a deadline), each socket is still closed, not left to the
    garbage collector."""
    async with Sink(name="cut", pipelining=True) as relay:
        client = client_for(relay)
        await warm(client, relay)
        relay.faults.blackhole = True  # QUIT goes unanswered
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.close()
        await asyncio.sleep(0.2)  # the relay's side of the close
        assert relay.open_sessions == 0
