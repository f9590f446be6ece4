"""MAIL parameters to a relay, against a real aiosmtpd relay on loopback that records them:
BODY=8BITMIME for 8-bit data to a relay that offers 8BITMIME (RFC 6152 §3), SIZE with the
message's length to one that offers SIZE (RFC 1870), on the pipelined path (chained messages
included) and step by step. 8-bit data to a relay without 8BITMIME goes as it is.

The relay here rather than `testing.sink.Sink`: the sink neither records MAIL parameters nor
lets a test take 8BITMIME or SIZE out of its EHLO reply. Each test checks the exact parameter
list, so each one fails when no parameter is sent at all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpfleet.config import DeliveryConfig, RelayConfig
from smtpfleet.delivery.classify import Outcome, Verdict
from smtpfleet.relays.pool import RelayClient, SessionSettings

pytestmark = pytest.mark.timeout(30)

SEVEN_BIT = b"Subject: plain\r\n\r\n.leading dot\r\nbody\r\n"
# UTF-8 in a header and in the body, and a line that starts with a dot (stuffed on the wire).
EIGHT_BIT = "Subject: caf\u00e9\r\n\r\n.\u00fcber\r\nna\u00efve body\r\n".encode()
RCPTS = ("a@example.net", "b@example.net")
BOTH_MODES = pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "step"])


@dataclass(frozen=True)
class Received:
    sender: str
    mail_options: tuple[str, ...]
    data: bytes


@dataclass
class Offers:
    """Which extensions the relay names in its EHLO reply."""

    pipelining: bool = True
    eight_bit_mime: bool = True
    size: bool = True


@dataclass
class Recorder:
    """aiosmtpd handler: edits the EHLO reply to `offers`, records each accepted message."""

    offers: Offers
    messages: list[Received] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, lines: list[str]
    ) -> list[str]:
        session.host_name = hostname  # with this hook in place, aiosmtpd leaves it to us
        kept = [line for line in lines if self._offered(line)]
        if self.offers.pipelining:
            kept.insert(len(kept) - 1, "250-PIPELINING")
        return kept

    def _offered(self, line: str) -> bool:
        keyword = line[4:].split(" ", 1)[0].upper()
        if keyword == "8BITMIME":
            return self.offers.eight_bit_mime
        return keyword != "SIZE" or self.offers.size

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address  # with a hook in place aiosmtpd leaves it to us
        envelope.mail_options.extend(options)  # as aiosmtpd parsed them: upper-cased, split
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = bytes(envelope.original_content or b"")  # dot-stuffing undone
        self.messages.append(
            Received(str(envelope.mail_from), tuple(envelope.mail_options), content)
        )
        return "250 2.0.0 Ok: stored"


class CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting the segments it reads: shows which path the client took."""

    def __init__(self, relay: Relay) -> None:
        # decode_data=False: the bytes as sent, and aiosmtpd offers 8BITMIME (and SIZE).
        super().__init__(relay.recorder, hostname="relay.test", decode_data=False)
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.reads += 1
        super().data_received(data)


class Relay:
    """A real aiosmtpd server on 127.0.0.1, port 0, with a `Recorder`."""

    def __init__(self, offers: Offers) -> None:
        self.recorder = Recorder(offers)
        self.port = 0
        self.reads = 0
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    @property
    def messages(self) -> list[Received]:
        return self.recorder.messages

    async def __aenter__(self) -> Relay:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def _protocol(self) -> SMTP:
        protocol = CountingSMTP(self)
        self._sessions.add(protocol)
        return protocol

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for protocol in self._sessions:
            if protocol.transport is not None:
                protocol.transport.close()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the session tasks see their connections go


def client_for(
    relay: Relay, *, connections: int = 4, chained: Callable[[str], None] | None = None
) -> RelayClient:
    config = DeliveryConfig(connect_timeout_s=2.0, command_timeout_s=2.0)
    relay_config = RelayConfig(
        name="params", host="127.0.0.1", port=relay.port, max_connections=connections
    )
    settings = SessionSettings(config, "mx.test", lease_ttl_s=5.0, on_chained=chained)
    return RelayClient(relay_config, settings)


async def send_one(relay: Relay, body: bytes) -> Received:
    """One message on a fresh session, delivered byte-exact by the path the relay asks for."""
    client = client_for(relay)
    try:
        verdicts = await client.send("s@example.com", RCPTS, body)
    finally:
        await client.close()
    assert {v.outcome for v in verdicts.values()} == {Outcome.DELIVERED}
    [received] = relay.messages
    assert received.data == body  # byte-exact
    # EHLO, the envelope, the message, QUIT; or EHLO, MAIL, two RCPT, DATA, the message, QUIT.
    assert relay.reads == (4 if relay.recorder.offers.pipelining else 7)
    return received


@BOTH_MODES
async def test_an_8bit_body_is_declared_8bitmime(pipelined: bool) -> None:
    async with Relay(Offers(pipelining=pipelined)) as relay:
        received = await send_one(relay, EIGHT_BIT)
    assert received.mail_options == ("BODY=8BITMIME", f"SIZE={len(EIGHT_BIT)}")


@BOTH_MODES
async def test_a_7bit_body_has_no_body_parameter(pipelined: bool) -> None:
    async with Relay(Offers(pipelining=pipelined)) as relay:
        received = await send_one(relay, SEVEN_BIT)
    assert received.mail_options == (f"SIZE={len(SEVEN_BIT)}",)  # no BODY: 7BIT is implied


@BOTH_MODES
@pytest.mark.parametrize("size", [True, False], ids=["size-offered", "no-size"])
async def test_size_is_declared_only_to_a_relay_that_offers_it(pipelined: bool, size: bool) -> None:
    async with Relay(Offers(pipelining=pipelined, size=size)) as relay:
        received = await send_one(relay, EIGHT_BIT)
    expected = ("BODY=8BITMIME", f"SIZE={len(EIGHT_BIT)}") if size else ("BODY=8BITMIME",)
    assert received.mail_options == expected


@BOTH_MODES
async def test_an_8bit_body_to_a_relay_without_8bitmime_goes_as_it_is(pipelined: bool) -> None:
    """Neither converted nor bounced (as Postfix with MIME conversion disabled): the same
    bytes, no BODY parameter; SIZE still, as the relay offers it."""
    async with Relay(Offers(pipelining=pipelined, eight_bit_mime=False)) as relay:
        received = await send_one(relay, EIGHT_BIT)
    assert received.mail_options == (f"SIZE={len(EIGHT_BIT)}",)


async def test_a_chained_envelope_declares_its_own_message() -> None:
    """Messages waiting for the one session ride on the body before them (RFC 2920 §3.1):
    each carried MAIL says what its own message is (8-bit or not, its length), not what the
    carrier's is."""
    chained: list[str] = []
    lengths = range(8)  # each message its own length, 8-bit and 7-bit by turns
    bodies = [(EIGHT_BIT if n % 2 else SEVEN_BIT) + b"x" * n + b"\r\n" for n in lengths]
    async with Relay(Offers()) as relay:
        client = client_for(relay, connections=1, chained=chained.append)
        try:
            results: list[dict[str, Verdict]] = await asyncio.gather(
                *(client.send(f"s{n}@example.com", RCPTS, body) for n, body in enumerate(bodies))
            )
        finally:
            await client.close()
    assert {v.outcome for r in results for v in r.values()} == {Outcome.DELIVERED}
    assert len(chained) == len(bodies) - 1  # every envelope after the first rode on a body
    got = {m.sender: (m.mail_options, m.data) for m in relay.messages}
    expected = {f"s{n}@example.com": (_declared(body), body) for n, body in enumerate(bodies)}
    assert got == expected


def _declared(body: bytes) -> tuple[str, ...]:
    size = f"SIZE={len(body)}"
    return (size,) if body.isascii() else ("BODY=8BITMIME", size)
