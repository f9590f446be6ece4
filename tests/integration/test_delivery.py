"""Accept → queue → deliver through one in-process node, real Redis, real sinks."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time
from typing import Any

import pytest
import redis

from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.keys import GROUP, Keys
from smtpfleet.testing import (
    domain_routed_first_to,
    eventually,
    make_message,
    node_config,
    ring_order,
    running_node,
    send,
)
from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sink import ReceivedMessage, Sink

pytestmark = pytest.mark.timeout(60)


async def test_message_is_delivered_once_with_trace_header(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0], data=make_message(body="..dot\r\nbody\r\n"))
        assert reply.code == 250
        assert "queued as" in reply.text
        qid = reply.text.rsplit(" ", 1)[-1]
        await eventually(lambda: sink.count == 1)
        received = sink.messages[0]
        assert received.sender == "sender@example.com"
        assert received.recipients == ("rcpt@example.net",)
        assert received.data.startswith(b"Received: from ")
        assert qid.encode() in received.data.split(b"\r\n\r\n")[0]
        assert b"\r\n\r\n..dot\r\nbody\r\n" in received.data  # dot-stuffing undone then redone
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_tempfail_then_success_is_delivered_after_retry(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    sink.faults.data_replies = ["451 4.3.0 Try again later"]
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink.count == 1, timeout_s=10)
        assert len(sink.rejected) == 1  # the first attempt really reached the relay


async def test_tempfail_moves_to_next_relay_at_once(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink
) -> None:
    # Retries far in the future: the message may only arrive through the at-once fallback.
    overrides = {"redis": {"prefix": prefix}, "retry": {"initial_s": 3600, "max_s": 3600}}
    config = node_config(redis_url, [sink.address, sink_b.address], overrides)
    # The 451 relay (relay-1, `sink`) must come first for the key, or it is never tried.
    domain = domain_routed_first_to(config, "relay-1")
    assert ring_order(config, domain) == ["relay-1", "relay-2"]
    sink.faults.data_replies = ["451 4.3.0 Try again later"] * 10
    async with running_node(config) as node:
        for n in range(1, 4):
            # One at a time: nothing in flight, so bounded load cannot reorder the ring.
            assert (
                await send(node.inbound.addresses[0], recipients=[f"r{n}@{domain}"])
            ).code == 250
            await eventually(lambda n=n: sink_b.count == n, timeout_s=10)
        assert len(sink.rejected) == 3  # each was tried on the 451 relay first
        assert sink.count == 0
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_permanent_failure_bounces_once_to_sender(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    sink.faults.rcpt_replies = {"gone@example.net": "550 5.1.1 User unknown"}
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        reply = await send(
            node.inbound.addresses[0], recipients=["gone@example.net", "here@example.net"]
        )
        assert reply.code == 250
        await eventually(lambda: sink.count == 2)
        await eventually(lambda: node.worker.in_flight == 0)
        by_sender = {m.sender: m for m in sink.messages}
        assert by_sender["sender@example.com"].recipients == ("here@example.net",)
        dsn = by_sender[""]
        assert dsn.recipients == ("sender@example.com",)
        parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert b"Final-Recipient: rfc822; gone@example.net" in dsn.data
        assert (
            b"here@example.net"
            not in dsn.data.split(b"message/delivery-status")[1].split(b"text/rfc822-headers")[0]
        )
        assert b"Status: 5.1.1" in dsn.data
        # RFC 3464 2.3.5: the host that answered, not our name for it.
        assert b"Remote-MTA: dns; 127.0.0.1" in dsn.data
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_null_sender_failure_goes_to_dead_letters_not_a_bounce(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    sink.faults.rcpt_replies = {"gone@example.net": "550 5.1.1 User unknown"}
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0], sender="", recipients=["gone@example.net"])
        assert reply.code == 250
        await eventually(lambda: sink.refused_recipients == ["gone@example.net"])

        async def one_dead_letter() -> bool:
            return (await node.queue.depth())["dead"] == 1

        await eventually(one_dead_letter)
        assert sink.count == 0  # no DSN for a null sender, ever


async def test_expired_message_bounces_with_4_4_7(redis_url: str, prefix: str, sink: Sink) -> None:
    # The recipient is always "busy"; the sender's mailbox (where the DSN goes) is fine.
    sink.faults.rcpt_replies = {"rcpt@example.net": "451 4.2.1 Mailbox busy"}
    overrides = {"redis": {"prefix": prefix}, "retry": {"lifetime_s": 1.5}}
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink.count == 1, timeout_s=15)
        assert len(sink.refused_recipients) >= 2  # retried before giving up
        dsn = sink.messages[0]
        assert dsn.sender == ""
        assert dsn.recipients == ("sender@example.com",)
        assert b"Status: 4.4.7" in dsn.data
        assert b"451 4.2.1 Mailbox busy" in dsn.data
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_resent_message_is_deduplicated(redis_url: str, prefix: str, sink: Sink) -> None:
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    data = make_message(message_id="<same-message@test>")
    async with running_node(config) as node:
        first = await send(node.inbound.addresses[0], data=data)
        second = await send(node.inbound.addresses[0], data=data)
        assert first.code == second.code == 250
        assert first.text.rsplit(" ", 1)[-1] == second.text.rsplit(" ", 1)[-1]
        other = await send(node.inbound.addresses[0], data=data, recipients=["x@example.net"])
        assert other.text.rsplit(" ", 1)[-1] != first.text.rsplit(" ", 1)[-1]
        await eventually(lambda: sink.count == 2)
        await eventually(lambda: node.worker.in_flight == 0)
        assert sink.count == 2


async def test_foreign_domain_is_refused_for_outside_clients(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    overrides = {
        "redis": {"prefix": prefix},
        "inbound": {"relay_networks": [], "accepted_domains": ["example.net"]},
    }
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        refused = await send(node.inbound.addresses[0], recipients=["victim@elsewhere.org"])
        assert refused.code == 550
        assert refused.text.startswith("5.7.1")
        tricked = await send(
            node.inbound.addresses[0], recipients=["victim%elsewhere.org@example.net"]
        )
        assert tricked.code == 550
        ours = await send(node.inbound.addresses[0], recipients=["someone@example.net"])
        assert ours.code == 250
        await eventually(lambda: sink.count == 1)
        assert sink.messages[0].recipients == ("someone@example.net",)


async def test_a_poison_address_is_the_messages_fault_never_the_relays(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """Entries that our client refuses to send (queued before inbound refused such addresses,
    or by any other path) fail permanently for that address alone, with a reason, and never
    count against the relay's health."""
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        mixed = NewMessage(
            qid=new_qid(0),
            sender="sender@example.com",
            recipients=("\x1fa..b@example.net", "ok@example.net"),
            data=make_message(),
        )
        poison_sender = NewMessage(
            qid=new_qid(1),
            sender="\x0bpoison@fuzz.example",
            recipients=("other@example.net",),
            data=make_message(),
        )
        await node.queue.enqueue(mixed)
        await node.queue.enqueue(poison_sender)
        # The clean recipient, and a DSN for the poison one to its sender.
        await eventually(lambda: sink.count == 2, timeout_s=10)
        by_sender = {m.sender: m for m in sink.messages}
        assert by_sender["sender@example.com"].recipients == ("ok@example.net",)
        dsn = by_sender[""]
        assert dsn.recipients == ("sender@example.com",)
        assert b"Status: 5.1.3" in dsn.data
        # The poison sender cannot be told: its failure ends in the dead letters, with the reason.
        await eventually(lambda: node.worker.in_flight == 0)

        async def settled() -> bool:
            depth = await node.queue.depth()
            return depth["stream"] == 0 and depth["retry"] == 0 and depth["dead"] >= 1

        await eventually(settled, timeout_s=10)
        registry = node.registry
        labels = {"relay": "relay-1"}
        unsendable = registry.get_sample_value(
            "smtpfleet_deliveries_total", labels | {"outcome": "unsendable"}
        )
        assert unsendable is not None
        assert unsendable == 2  # one per poison address; the second has no DSN to try
        for trouble in ("connection_error", "timeout"):
            seen = registry.get_sample_value(
                "smtpfleet_deliveries_total", labels | {"outcome": trouble}
            )
            assert not seen, trouble
        assert "relay-1" in node.health.healthy


async def test_a_bug_in_the_delivery_reader_restarts_it_instead_of_stopping_delivery(
    redis_url: str, prefix: str, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        read = node.queue.read
        failures: list[str] = []

        async def read_with_a_bug_once(*args: Any, **kwargs: Any) -> Any:
            if not failures:
                failures.append("raised")
                raise RuntimeError("a bug outside the Redis boundary")
            return await read(*args, **kwargs)

        node.worker._rescan = False  # the next read is a plain one: the patched call
        # and the accept leaves the entry to the reader rather than reading it for the worker
        monkeypatch.setattr(node.worker, "wants", lambda lane: False)
        monkeypatch.setattr(node.queue, "read", read_with_a_bug_once)
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink.count == 1)
        assert failures == ["raised"]
        restarts = node.metrics.registry.get_sample_value(
            "smtpfleet_task_restarts_total", {"task": "delivery-reader"}
        )
        assert restarts == 1


@pytest.mark.parametrize("landed", [False, True], ids=["finish-lost", "reply-lost"])
async def test_a_sent_message_whose_finish_failed_is_finished_not_sent_again(
    redis_url: str, prefix: str, sink: Sink, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """The relay took the message, then the finish's connection broke (a probe's CLIENT KILL
    loop: 17 of 520 messages delivered twice or three times). The entry is pending under this
    node, its rescan hands it back: it is finished with what is known, not sent again."""
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        finish = node.queue.finish
        broken: list[str] = []

        async def finish_once_broken(delivery: Any, outcome: Any) -> None:
            if not broken:
                broken.append(delivery.label)
                if landed:  # it ran in Redis, and its reply was lost
                    await finish(delivery, outcome)
                raise QueueUnavailable("redis: ConnectionError: Connection reset by peer")
            await finish(delivery, outcome)

        monkeypatch.setattr(node.queue, "finish", finish_once_broken)
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: bool(broken))

        async def nothing_pending() -> bool:
            keys, client = node.queue.keys, node.queue.client
            pending = [await client.xpending(keys.stream(s), GROUP) for s in keys.all_shards()]
            depth = await node.queue.depth()
            return depth == {"stream": 0, "retry": 0, "dead": 0} and not any(
                p["pending"] for p in pending
            )

        await eventually(nothing_pending, timeout_s=15)
        await asyncio.sleep(0.5)  # time for a second copy, should one be sent
        assert sink.count == 1


async def test_a_bounce_that_cannot_be_queued_does_not_send_the_message_again(
    sink: Sink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One recipient took the message, another was refused (550), and Redis filled up before
    the bounce was queued (a probe: 660 copies to the first recipient in 4 s, the rescan
    handing the entry back at once each time). The bounce is queued once Redis takes writes
    again, the first recipient gets one copy, and the rescan waits longer each time."""
    sink.faults.rcpt_replies["gone@example.net"] = "550 5.1.1 User unknown"
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        record = sink._record

        def fill_redis_on_first_copy(message: ReceivedMessage) -> None:
            if message.sender and not sink.messages:
                admin.config_set("maxmemory", "1")  # every write refused (OOM) from now on
            record(message)

        monkeypatch.setattr(sink, "_record", fill_redis_on_first_copy)
        # A lease longer than the test: the node does not fence while Redis is full, as with
        # the default 5 s lease until it ran out.
        cluster = {"heartbeat_interval_s": 1.0, "lease_s": 10.0}
        config = node_config(server.url, [sink.address], {"cluster": cluster})
        async with running_node(config) as node:
            recipients = ["kept@example.net", "gone@example.net"]
            with caplog.at_level(logging.WARNING, logger="smtpfleet.delivery.worker"):
                assert (await send(node.inbound.addresses[0], recipients=recipients)).code == 250
                await eventually(lambda: sink.count == 1)
                await asyncio.sleep(3.0)  # Redis full: each rescan fails to queue the bounce
                admin.config_set("maxmemory", "0")
                await eventually(lambda: any(m.sender == "" for m in sink.messages), timeout_s=20)
                await asyncio.sleep(1.0)  # time for another copy, should one be sent
        admin.close()
    by_sender = {m.sender: m for m in sink.messages}
    assert sink.count == 2, [(m.sender, m.recipients) for m in sink.messages]
    assert by_sender["sender@example.com"].recipients == ("kept@example.net",)
    assert b"Final-Recipient: rfc822; gone@example.net" in by_sender[""].data
    interrupted = [r for r in caplog.records if "interrupted" in r.getMessage()]
    assert 1 <= len(interrupted) <= 8, len(interrupted)  # 0.2, 0.5, 1, 2 s apart: not 555


GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550-5.1.1 unnecessary spaces. For more information, go to\r\n"
    "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser d2e1a72fcca58si1234 - gsmtp"
)


def _bounce(sink: Sink) -> email.message.EmailMessage:
    (dsn,) = [m for m in sink.messages if m.sender == ""]
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _parts(bounce: email.message.EmailMessage) -> list[Any]:
    """The human part, the delivery report and the returned headers (RFC 6522)."""
    human, report, headers = bounce.iter_parts()
    return [human, report, headers]


def _report(bounce: email.message.EmailMessage) -> list[email.message.Message]:
    blocks = _parts(bounce)[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


async def test_a_relays_whole_reply_reaches_the_bounce(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """RFC 3464 2.3.6: the actual diagnostic; a 200-character cut lost Gmail's URL, and a
    single reply line may be 512 octets (RFC 5321 4.5.3.1.5)."""
    long_line = "550 5.7.1 Rejected by policy: " + " ".join(f"t{i:03d}" for i in range(90))
    sink.faults.rcpt_replies = {
        "gmail@example.net": GMAIL_NO_SUCH_USER,
        "long@example.net": long_line + " END",
    }
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        recipients = ["gmail@example.net", "long@example.net"]
        assert (await send(node.inbound.addresses[0], recipients=recipients)).code == 250
        await eventually(lambda: sink.count == 1)
    diagnostics = {b["Final-Recipient"]: b["Diagnostic-Code"] for b in _report(_bounce(sink))[1:]}
    assert diagnostics["rfc822; gmail@example.net"].endswith(
        "?p=NoSuchUser d2e1a72fcca58si1234 - gsmtp"
    )
    assert diagnostics["rfc822; long@example.net"] == f"smtp; {long_line} END"


async def test_an_expiry_our_rate_limit_held_back_reports_the_relays_451(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink, redis_client: redis.Redis
) -> None:
    """A recipient the relay answered 451 expires at an attempt our own rate limit held back:
    the bounce says what the relay said, and names no relay for our limit (RFC 3464
    2.3.5-2.3.6). Only relay-1 may carry its mail (a routing rule), so the limit is all it
    meets; the bounce goes out through relay-2."""
    sink.faults.rcpt_replies = {"busy@limited.example": "451 4.2.1 Mailbox busy"}
    relays = [
        {"name": "relay-1", "host": sink.host, "port": sink.port, "max_messages_per_s": 1000},
        {"name": "relay-2", "host": sink_b.host, "port": sink_b.port},
    ]
    overrides = {
        "redis": {"prefix": prefix},
        "relays": relays,
        "routing": {
            "rules": [
                {
                    "name": "limited",
                    "recipient_domains": ["limited.example"],
                    "relays": {"names": ["relay-1"]},
                }
            ]
        },
        "retry": {"lifetime_s": 3.0},
        "delivery": {"command_timeout_s": 0.3},  # a spent budget is "limited" in 0.3 s
    }
    config = node_config(redis_url, [], overrides)
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0], recipients=["busy@limited.example"])
        assert reply.code == 250
        await eventually(lambda: sink.refused_recipients != [], timeout_s=10)
        # From now on relay-1's per-second budget is spent, cluster-wide, every second.
        now = int(time.time())
        for second in range(now - 1, now + 60):
            redis_client.set(Keys(prefix, 4).relay_rate("relay-1", second), 10**6, ex=120)
        await eventually(lambda: sink_b.count == 1, timeout_s=20)

        def limited() -> float:
            labels = {"relay": "relay-1", "outcome": "limited"}
            return node.registry.get_sample_value("smtpfleet_deliveries_total", labels) or 0

        assert limited() >= 1  # the attempt it expired at was held back by the limit
    (block,) = _report(_bounce(sink_b))[1:]
    assert block["Final-Recipient"] == "rfc822; busy@limited.example"
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"] == "smtp; 451 4.2.1 Mailbox busy"
    assert "Remote-MTA" not in block


async def test_a_nul_in_a_header_goes_back_quoted_printable(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """RFC 2045 2.7: no NUL in 7bit data; the returned headers still show it, as =00."""
    sink.faults.rcpt_replies = {"gone@example.net": "550 5.1.1 User unknown"}
    data = make_message(recipients=["gone@example.net"]).replace(
        b"\r\nSubject: test", b"\r\nX-Nul: a\x00b\r\nSubject: test"
    )
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0], recipients=["gone@example.net"], data=data)
        assert reply.code == 250
        await eventually(lambda: sink.count == 1)
    assert b"\x00" not in sink.messages[0].data
    headers = _parts(_bounce(sink))[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert "X-Nul: a\x00b\r\n" in headers.get_content()


async def test_an_international_bounce_domain_goes_out_as_its_a_label(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """RFC 2047 5(3): an encoded word is never part of an addr-spec."""
    sink.faults.rcpt_replies = {"gone@example.net": "550 5.1.1 User unknown"}
    overrides = {
        "redis": {"prefix": prefix},
        "bounce": {"from_address": "Bounces <bounces@exämple.com>"},
    }
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0], recipients=["gone@example.net"])
        assert reply.code == 250
        await eventually(lambda: sink.count == 1)
    assert b"\r\nFrom: Bounces <bounces@xn--exmple-cua.com>\r\n" in sink.messages[0].data
    (sender,) = _bounce(sink)["From"].addresses
    assert sender.addr_spec == "bounces@xn--exmple-cua.com"


async def test_a_bounce_at_expiry_words_a_refusal_and_an_expiry_apart(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """One recipient refused (550), one still deferred when the lifetime is over, in the same
    attempt: one bounce, and its human part says which is which."""
    sink.faults.rcpt_replies = {
        "gone@example.net": "550 5.1.1 User unknown",
        "busy@example.net": "451 4.2.1 Mailbox busy",
    }
    # Over at the first attempt: both answers come in the attempt that expires.
    overrides = {"redis": {"prefix": prefix}, "retry": {"lifetime_s": 0.001}}
    config = node_config(redis_url, [sink.address], overrides)
    async with running_node(config) as node:
        recipients = ["gone@example.net", "busy@example.net"]
        assert (await send(node.inbound.addresses[0], recipients=recipients)).code == 250
        await eventually(lambda: sink.count == 1)
    bounce = _bounce(sink)
    human = _parts(bounce)[0].get_content().replace("\r\n", "\n")
    refused, _, given_up = human.partition("so delivery has been given up.")
    assert "refused permanently" in refused
    assert "<gone@example.net>:\n    550 5.1.1 User unknown" in refused
    assert "busy@example.net" not in refused
    assert "<busy@example.net>:\n    451 4.2.1 Mailbox busy" in given_up
    assert "gone@example.net" not in given_up
    assert [b["Status"] for b in _report(bounce)[1:]] == ["5.1.1", "4.4.7"]
