"""Fuzz the delivery side: many messages at once through one `RelayClient` to a relay whose
faults change at random, so sessions pipeline, chain messages, break and recover.

The relay is a `Sink` (aiosmtpd) that records what it stores; it advertises PIPELINING, so
sessions pipeline and chain, or with `pipelining=False` it does not, and every command waits
for its reply (the step-by-step path, which real relays without PIPELINING take). Its
faults, redrawn every 10-200 ms: refused senders and recipients (4xx, 5xx), refusals at the
final dot, a final dot answered twice (a stray `550` or `250` after the real reply), a session
dropped after each message, a session dropped instead of any reply (a stored message's reply
lost with it), `421` and a close instead of any reply (a relay shutting down), slow replies.
Some sends are cancelled mid-way. What must hold, whatever the relay did:

- a recipient reported delivered was stored by the relay under that message;
- a recipient reported refused for good (5xx) was never stored under it;
- nothing was stored twice unless its verdict was temporary (a retry may then repeat it, as
  SMTP allows when a reply to the final dot is lost);
- no verdict is a reply the relay gave to no command of that message (a stray second reply
  to a final dot, read as the next message's), nor its "503 need MAIL" to a recipient (the
  verdict of a refused MAIL is MAIL's own reply);
- every send returns.

`run(seed, ...)` is the same sequence of choices for the same seed (the timing differs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from dataclasses import dataclass, field

from smtpfleet.config import DeliveryConfig, RelayConfig
from smtpfleet.delivery.classify import Outcome, Verdict
from smtpfleet.relays.pipelining import BAD_SEQUENCE
from smtpfleet.relays.pool import RelayClient, SessionSettings
from smtpfleet.testing.sink import Faults, Sink

BODY = b"Subject: relay fuzz\r\n\r\n.a line with a leading dot\r\nbody\r\n"
SEND_BOUND_S = 30.0  # far above any timeout a send runs into: beyond it, it hangs
# A final dot answered twice: the second reply answers no command, and must never become any
# recipient's verdict (it is recognised by its text).
STRAYS = ("550 5.1.1 stray refusal", "250 2.0.0 stray acceptance")
FINAL_REPLIES = (
    "250 2.0.0 ok",
    "451 4.3.0 try later",
    "554 5.6.0 refused",
    *(f"250 2.0.0 first\r\n{stray}" for stray in STRAYS),
)


@dataclass
class Report:
    seed: int
    messages: int = 0
    cancelled: int = 0
    chained: int = 0
    stored: int = 0
    sessions: int = 0
    dropped: int = 0
    closed: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)


def _redraw(faults: Faults, rnd: random.Random) -> None:
    faults.mail_reply = rnd.choice([None] * 8 + ["451 4.3.0 later", "550 5.7.1 no sender"])
    faults.rcpt_replies = {}  # per recipient, drawn as each message is made
    faults.data_replies = [rnd.choice(FINAL_REPLIES) for _ in range(rnd.randrange(3))]
    faults.close_after_data = rnd.random() < 0.1
    faults.drop_chance = rnd.choice([0.0] * 6 + [0.01, 0.05])
    faults.closing_chance = rnd.choice([0.0] * 6 + [0.01, 0.05])
    faults.delay_s = rnd.choice([0.0, 0.0, 0.0, 0.005, 0.02])


class _Fuzz:
    def __init__(self, seed: int, sink: Sink, client: RelayClient, report: Report) -> None:
        self.rnd = random.Random(seed)
        self.sink = sink
        self.client = client
        self.report = report
        self.verdicts: dict[str, dict[str, Verdict]] = {}
        self.numbers = iter(range(1, 1 << 30))

    async def chaos(self, until: float) -> None:
        while time.monotonic() < until:
            _redraw(self.sink.faults, self.rnd)
            await asyncio.sleep(self.rnd.uniform(0.01, 0.2))

    async def sender(self, until: float) -> None:
        while time.monotonic() < until:
            tag = f"m{next(self.numbers)}"
            recipients = [f"{tag}-{i}@example.net" for i in range(self.rnd.choice([1, 1, 2, 3]))]
            for recipient in recipients:
                if self.rnd.random() < 0.05:
                    refusal = self.rnd.choice(["550 5.1.1 no such user", "452 4.5.3 full"])
                    self.sink.faults.rcpt_replies[recipient] = refusal
            send = asyncio.ensure_future(self.client.send(f"{tag}@example.com", recipients, BODY))
            if self.rnd.random() < 0.02:
                await asyncio.sleep(self.rnd.uniform(0, 0.05))
                send.cancel()
            try:
                self.verdicts[tag] = await asyncio.wait_for(asyncio.shield(send), SEND_BOUND_S)
            except asyncio.CancelledError:
                self.report.cancelled += 1
            except TimeoutError:
                self.report.violations.append(f"{tag}: the send did not return")
                return

    def check(self) -> None:
        stored: collections.Counter[tuple[str, str]] = collections.Counter()
        for message in self.sink.messages:
            stored.update((message.sender, r) for r in message.recipients)
        self.report.stored = sum(stored.values())
        for tag, verdicts in self.verdicts.items():
            for recipient, verdict in verdicts.items():
                self.report.outcomes[verdict.outcome.value] += 1
                self._check_one(tag, recipient, verdict, stored[f"{tag}@example.com", recipient])

    def _check_one(self, tag: str, recipient: str, verdict: Verdict, stored: int) -> None:
        if verdict.outcome is Outcome.DELIVERED and not stored:
            self.report.violations.append(f"{tag} {recipient}: delivered, never stored: {verdict}")
        if verdict.outcome is Outcome.PERMANENT and stored:
            self.report.violations.append(f"{tag} {recipient}: bounced, but stored: {verdict}")
        if stored > 1 and verdict.outcome is not Outcome.TEMPORARY:
            self.report.violations.append(f"{tag} {recipient}: stored {stored} times")
        if any(stray in verdict.text for stray in STRAYS):
            self.report.violations.append(f"{tag} {recipient}: a stray reply as its verdict")
        if verdict.code == BAD_SEQUENCE:  # replies read one off: an RCPT's answer after MAIL's
            self.report.violations.append(f"{tag} {recipient}: out of sequence: {verdict}")


async def run(
    seed: int, seconds: float, *, senders: int | None = None, pipelining: bool = True
) -> Report:
    """One run against a fresh relay; the connection limit, the messages per connection and
    the number of senders are drawn from the seed too."""
    rnd = random.Random(seed)
    report = Report(seed)
    async with Sink(name="fuzz", pipelining=pipelining) as sink:
        sink.faults.draws.seed(rnd.randrange(1 << 30))
        config = DeliveryConfig(
            connect_timeout_s=1.0,
            command_timeout_s=0.5,
            max_messages_per_connection=rnd.choice([3, 50, 1000]),
        )
        relay = RelayConfig(
            name="fuzz", host=sink.host, port=sink.port, max_connections=rnd.choice([1, 2, 3])
        )
        chained: list[str] = []
        settings = SessionSettings(config, "mx.test", lease_ttl_s=5.0, on_chained=chained.append)
        client = RelayClient(relay, settings)
        fuzz = _Fuzz(rnd.randrange(1 << 30), sink, client, report)
        until = time.monotonic() + seconds
        workers = senders or rnd.choice([4, 8, 16])
        try:
            await asyncio.gather(fuzz.chaos(until), *(fuzz.sender(until) for _ in range(workers)))
        finally:
            sink.faults = Faults()
            with contextlib.suppress(Exception):
                await client.close()
        fuzz.check()
        report.messages = len(fuzz.verdicts) + report.cancelled
        report.chained = len(chained)
        report.sessions = sink.connections
        report.dropped = sink.dropped
        report.closed = sink.closed
    return report
