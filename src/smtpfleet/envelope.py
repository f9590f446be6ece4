"""The message as the queue holds it: pure data, serialised compactly for stream entries."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Kind(StrEnum):
    MAIL = "mail"
    DSN = "dsn"  # a bounce we generated: never bounced again (RFC 3464 section 1)


class EntryState(StrEnum):
    """Where a queued message is (DESIGN invariant 2: "still queued and visible")."""

    READY = "ready"  # in a stream, not read by any worker yet
    IN_FLIGHT = "in_flight"  # read by a worker (pending in the consumer group)
    RETRY = "retry"  # waiting in a retry set for its due time
    DEAD = "dead"  # in the dead letters, with its body, for an operator


def now_ms() -> int:
    return int(time.time() * 1000)


def new_qid(shard: int) -> str:
    """A queue id that names its shard (so any tool can find its keys) and sorts by time."""
    return f"{shard}.{now_ms():011X}{secrets.token_hex(4).upper()}"


def split_qid(qid: str, attempt: int) -> str:
    """The queue id of the dead letter split off `qid` at `attempt` while other recipients
    still wait: in the same shard, never an id `new_qid` makes (longer, and X is no hex)."""
    return f"{qid}X{attempt}"


def shard_of(qid: str) -> int:
    """The shard a queue id lives in; ValueError for anything that is not one of ours."""
    head, sep, tail = qid.partition(".")
    if not sep or not head.isdigit() or not tail.isalnum():
        raise ValueError(f"not a queue id: {qid!r}")
    return int(head)


def dedupe_fingerprint(
    message_id: str | None, sender: str, recipients: tuple[str, ...], *, content: bytes
) -> str | None:
    """RFC 1047: the same message (Message-ID and content, as the client sent them) from the
    same sender to the same recipients is one message: a resend after a lost reply.

    The content counts because applications reuse a Message-ID for different messages (an
    alert's fixed id), which RFC 5322 forbids but happens: without it the second one got the
    first one's `250` and was never delivered. Local parts keep their case (RFC 5321 §2.4);
    domains do not.
    """
    if not message_id:
        return None
    digest = hashlib.sha256(content)
    for part in (message_id.strip(), _address(sender), *sorted(map(_address, recipients))):
        digest.update(b"\0" + part.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _address(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address


def choose_shard(fingerprint: str | None, shards: int) -> int:
    """A resend must land in the shard of its first copy, so dedupe can stay within one hash tag."""
    if fingerprint is None:
        return random.randrange(shards)
    return int(fingerprint[:8], 16) % shards


@dataclass(frozen=True)
class NewMessage:
    """What inbound hands to the spool: the envelope and the full message (headers + body)."""

    qid: str  # allocated by inbound (new_qid(choose_shard(...))) so Received can name it
    sender: str  # "" is the null reverse-path
    recipients: tuple[str, ...]
    data: bytes  # CRLF line endings, dot-stuffing already undone
    fingerprint: str | None = None  # dedupe_fingerprint(...); None disables dedupe
    kind: Kind = Kind.MAIL
    tenant: str | None = None  # for routing rules: the authenticated user or tenant header
    # The traffic class a trusted client asked for (queue.class_header), or the lane of the
    # message a DSN reports on; None: the queue's class conditions decide (queue/classes.py).
    traffic_class: str | None = None


@dataclass(frozen=True)
class EnqueueResult:
    qid: str
    duplicate: bool = False  # the same message was accepted before; no second copy was made


@dataclass(frozen=True)
class QueuedMessage:
    """One stream entry: everything needed to deliver, except the body (stored once, by qid)."""

    qid: str
    sender: str
    recipients: tuple[str, ...]
    accepted_ms: int
    attempts: int = 0
    kind: Kind = Kind.MAIL
    # recipient -> last temporary failure text, carried across retries for the expiry DSN
    last_errors: dict[str, str] = field(default_factory=dict)
    # For routing rules (relays/rules.py): who sent it, when known. Stored only when set, so
    # entries without one (and those written before it existed) read the same everywhere.
    tenant: str | None = None
    # Its traffic class's lane (queue/classes.py): "" is the default class, which is not
    # stored, so queues without classes keep the entries of before.
    traffic_class: str = ""

    @property
    def shard(self) -> int:
        return shard_of(self.qid)

    def encode(self) -> str:
        fields: dict[str, object] = {
            "q": self.qid,
            "f": self.sender,
            "r": list(self.recipients),
            "t": self.accepted_ms,
            "a": self.attempts,
            "k": self.kind.value,
            "e": self.last_errors,
        }
        if self.tenant is not None:
            fields["n"] = self.tenant
        if self.traffic_class:
            fields["c"] = self.traffic_class
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> QueuedMessage:
        raw = json.loads(text)
        return cls(
            qid=raw["q"],
            sender=raw["f"],
            recipients=tuple(raw["r"]),
            accepted_ms=int(raw["t"]),
            attempts=int(raw.get("a", 0)),
            kind=Kind(raw.get("k", Kind.MAIL.value)),
            last_errors=dict(raw.get("e", {})),
            tenant=raw.get("n"),
            traffic_class=raw.get("c", ""),
        )

    def retry_of(self, recipients: tuple[str, ...], errors: dict[str, str]) -> QueuedMessage:
        """The same message, for the recipients still to do, one attempt further on."""
        return replace(self, recipients=recipients, attempts=self.attempts + 1, last_errors=errors)
