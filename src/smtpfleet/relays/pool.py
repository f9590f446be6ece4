"""The relay pool: pooled SMTP sessions to the relays (aiosmtplib), many messages per connection.

One `RelayClient` per relay holds idle sessions and caps how many are open at once: per node
with a semaphore, and across the cluster with connection leases and a per-second message
budget in Redis (`SharedLimits`), so a whole cluster draining a backlog after an outage does
not flood a relay. A message is sent as MAIL, one RCPT per recipient, DATA: every recipient
gets its own verdict. Relays that advertise PIPELINING get the envelope in one write
(relays/pipelining.py); the others get it step by step. Either way MAIL declares BODY=8BITMIME
and SIZE as the session's relay offers them (relays/mail_params.py).

When a message waits for a session (every one of the relay's connections busy), the message
on a session about to send its body carries the waiter's envelope in the same write and hands
it the session with the relay's replies (`_Baton`, `_Handoff`): one write and one round trip
per message on a busy session instead of two. The waiter is the next in line (past the slot
gate and waiting for a session, else the gate's next), never one further back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import aiosmtplib

from smtpfleet.cluster.store import SharedLimits
from smtpfleet.config import DeliveryConfig, RelayConfig, TlsPolicy
from smtpfleet.delivery.classify import (
    Verdict,
    classify_exception,
    classify_reply,
    limit_reached,
    no_session,
    positive,
    relay_paused,
    unsendable,
)
from smtpfleet.envelope import now_ms
from smtpfleet.errors import LimitsUnavailable
from smtpfleet.queue.keys import lease_member
from smtpfleet.relays import mail_params, pipelining
from smtpfleet.relays.gate import Hold, PriorityGate
from smtpfleet.replies import CLOSING_CODE

log = logging.getLogger(__name__)

# Relays commonly drop sessions idle for a minute or more; reconnecting before that costs less
# than discovering a dead session on the next message.
MAX_IDLE_S = 30.0
# An idle session holds one of the relay's cluster-wide connection leases: give it back soon,
# or a busy node's idle pool would starve the other nodes.
SHARED_IDLE_S = 1.0
REAP_INTERVAL_S = 0.5
QUIT_TIMEOUT_S = 2.0  # a session closed after use waits this long for the reply to QUIT
LIMIT_POLL_S = 0.05
# A message of a lower traffic class waiting for the relay's per-second budget asks this much
# later into each new second per class below the first, so that across the cluster the higher
# classes' waiters take the new second's budget first (docs/cluster.md, traffic classes).
CLASS_LAG_S = 0.05
LIMIT_REACHED = limit_reached()
PAUSED = relay_paused()


@dataclass(frozen=True)
class Lease:
    """What a new session got from the relay's cluster-wide connection limit."""

    member: str | None = None  # the lease held in Redis; None: none is held
    full: bool = False  # the limit had no room within LEASE_WAIT_S: park, do not connect


UNLIMITED: Final = Lease()  # no shared limit configured, or Redis away (the per-node cap holds)
FULL: Final = Lease(full=True)
OWN_SESSION_FREE: Final = Lease(member="")  # no new lease needed: one of ours went idle
# Longest wait for a cluster-wide connection lease before parking: holders over their share
# give one back within a reap interval (share_with_waiters) plus the message they are on.
LEASE_WAIT_S = 2.0
NO_SESSION = no_session()


class SmtpSession(Protocol):
    """The part of an aiosmtplib.SMTP session a relay client uses once it is connected."""

    @property
    def is_connected(self) -> bool: ...

    async def mail(
        self, sender: str, /, *, options: Iterable[str] | None = None
    ) -> aiosmtplib.SMTPResponse: ...

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse: ...

    async def data(self, message: bytes) -> aiosmtplib.SMTPResponse: ...

    async def rset(self) -> aiosmtplib.SMTPResponse: ...

    async def quit(self) -> aiosmtplib.SMTPResponse: ...

    def close(self) -> None: ...


Connect = Callable[[RelayConfig], Awaitable[SmtpSession]]


@dataclass(eq=False)
class _Session:
    smtp: SmtpSession
    lease: str | None
    messages: int = 0
    last_used: float = 0.0
    # What its relay's EHLO offered for MAIL's parameters: read once, before its first MAIL.
    extensions: mail_params.Extensions | None = None


Handed = tuple[_Session, pipelining.EnvelopeReplies]


def _new_future() -> asyncio.Future[Handed | None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Baton:
    """A message waiting for a session, ready to ride on another's: its envelope goes in the
    same write as that message's body, and the session comes to it with the replies
    (`handed`: None when the session broke first; cancelled: the waiter gave up)."""

    envelope: pipelining.Envelope
    picked: bool = False
    claimed: bool = False  # the waiter took the session from `handed`
    handed: asyncio.Future[Handed | None] = field(default_factory=_new_future)

    def live(self) -> bool:
        return not self.picked and not self.handed.done()


class _Handoff:
    """One transaction's chance to carry the next waiter's envelope with its body."""

    def __init__(self, client: RelayClient, session: _Session, hold: Hold) -> None:
        self._client = client
        self._session = session
        self._hold = hold
        self.baton: _Baton | None = None
        self.handed_on = False  # the session now belongs to the baton's holder
        self.spoiled = False  # the relay waits for a body that will not come: drop the session

    def __call__(self) -> pipelining.Envelope | None:
        self.baton = self._client._pick(self._session, self._hold)
        return self.baton.envelope if self.baton is not None else None

    def settle(self, replies: pipelining.EnvelopeReplies | None, usable: bool) -> None:
        """The carried envelope's replies were read (None: they could not be); `usable`: the
        session is in step and open. Hands it on, or tells the waiter to find another."""
        baton = self.baton
        if baton is None or baton.handed.done():
            self.spoiled = baton is not None  # abandoned: nobody will send its body
            return
        if replies is not None and usable:
            baton.handed.set_result((self._session, replies))
            self.handed_on = True
        else:
            baton.handed.set_result(None)

    def fail(self) -> None:
        """This transaction failed: the waiter must find another session."""
        if self.baton is not None and not self.baton.handed.done():
            self.baton.handed.set_result(None)


HANDED: Final = object()  # _take: the session comes through the baton


@dataclass(frozen=True)
class SessionSettings:
    """What every relay's sessions share: one node's delivery settings and hooks."""

    config: DeliveryConfig
    helo: str
    # A session's cluster-wide lease lives this long unless refreshed: the cluster's node
    # lease, so a killed node's connections stop counting when it is declared dead.
    lease_ttl_s: float
    limits: SharedLimits | None = None
    owner: str = ""
    on_tls: Callable[[str, str, str | None], None] | None = None
    # A message's envelope went in the same write as the previous message's body (relay name).
    on_chained: Callable[[str], None] | None = None
    # No reply came to a message's final dot, which went out (the session broke, or the
    # reply timed out): the relay may have stored it, and its retry may deliver it twice.
    on_reply_lost: Callable[[str], None] | None = None
    # Opens a session; None: aiosmtplib to the relay's host (tests pass scripted sessions).
    connect: Connect | None = None
    # Whether an operator paused the relay (by name). The route is chosen before a send
    # waits for a slot or the budget, for up to `command_timeout_s`: a relay paused meanwhile
    # still got what waited (a probe: 40-46 messages over 20 s after every node saw it).
    paused: Callable[[str], bool] | None = None


class RelayClient:
    """Sessions to one relay: a per-node cap, cluster-wide leases and budget, idle pooling."""

    def __init__(self, relay: RelayConfig, settings: SessionSettings) -> None:
        self.relay = relay
        self._config = settings.config
        self._helo = settings.helo
        self._limits = settings.limits
        self._owner = settings.owner
        self._on_tls = settings.on_tls
        self._on_chained = settings.on_chained
        self._on_reply_lost = settings.on_reply_lost
        self._connect_to = settings.connect
        self._paused_by_name = settings.paused
        self._lease_ttl_ms = int(settings.lease_ttl_s * 1000)
        self._idle: list[_Session] = []
        self._open: set[_Session] = set()
        # Our share of the relay's cluster-wide connections while other owners wait for one
        # (None: nobody waits, keep what we hold). Without it, the first busy owner's sessions,
        # reused back to back, never go idle and never return a lease: the others starve, and
        # their mail waits for a retry ("limited") with a healthy relay.
        self._share: int | None = None
        # Deliveries past the gate waiting for a session of ours to go idle (with their baton,
        # if they could ride on another message's): a session given back wakes the first.
        self._waiting: list[tuple[asyncio.Future[None], _Baton | None]] = []
        self._closing: set[asyncio.Task[None]] = set()  # sessions being closed after use
        # By traffic class, then arrival; a waiter's baton lets a holder hand it its session.
        self._slots: PriorityGate[_Baton] = PriorityGate(relay.max_connections)
        # Chaining holds sessions busy back to back; a per-second budget is taken per message
        # before a session, so a relay that has one gets none.
        self._chains = not relay.max_messages_per_s
        self._tokens = itertools.count()
        self._full_until = 0.0  # a lease was refused: ask Redis again from then (monotonic)

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, priority: int = 0
    ) -> dict[str, Verdict]:
        """Per-recipient verdicts. Never raises for relay trouble: that is a verdict too.
        `priority`: the message's traffic class rank (0 first) at the relay's limits."""
        envelope = _envelope(sender, recipients, data)
        baton = _Baton(envelope) if self._chains and envelope and envelope.rcpts else None
        try:
            async with self._slots.held(priority, baton) as hold:
                if not await self._rate_slot(priority):
                    return dict.fromkeys(recipients, LIMIT_REACHED)
                if self._paused():  # while it waited: the next relay, or a short wait
                    return dict.fromkeys(recipients, PAUSED)
                return await self._deliver(hold, baton, sender, recipients, data, envelope)
        finally:
            if baton is not None and not baton.claimed:
                self._abandon(baton)  # cancelled or failed while it could still be carried

    async def _deliver(
        self,
        hold: Hold,
        baton: _Baton | None,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        envelope: pipelining.Envelope | None,
    ) -> dict[str, Verdict]:
        stale_retries = 1
        while True:
            taken = await self._session(baton)
            if baton is not None and baton.claimed:
                baton = None  # it rode once; a retry waits like any other
            if isinstance(taken, Verdict):
                return dict.fromkeys(recipients, taken)
            session, reused, replies = taken
            handoff = _Handoff(self, session, hold)
            try:
                verdicts = await self._transaction(
                    session, sender, recipients, data, envelope, replies, handoff
                )
            except asyncio.CancelledError:
                handoff.fail()
                # Cut off mid-transaction: closed in the background, and close() waits for it
                # (a shielded close nobody tracked was cut short when the loop ended, leaving
                # its socket open).
                self._close_later(self._discard(session))
                raise
            except Exception as exc:
                handoff.fail()
                await self._discard(session)
                if isinstance(exc, pipelining.PossiblyStored) and self._on_reply_lost:
                    self._on_reply_lost(self.relay.name)
                if reused and _is_stale(exc) and handoff.baton is None:
                    if not stale_retries:
                        return dict.fromkeys(recipients, NO_SESSION)
                    stale_retries -= 1
                    continue  # the relay closed an idle session: try a fresh one at once
                return dict.fromkeys(recipients, classify_exception(exc))
            if not handoff.handed_on:  # else the session went on with the next message
                await self._put_away(session, verdicts, handoff.spoiled)
            return verdicts

    async def _put_away(
        self, session: _Session, verdicts: dict[str, Verdict], spoiled: bool
    ) -> None:
        """After a transaction: back to the pool, or closed when it cannot carry another."""
        closing = any(v.code == CLOSING_CODE for v in verdicts.values())  # 421
        if spoiled:
            await self._drop(session)
        elif closing or not _in_step(session.smtp) or not session.smtp.is_connected:
            await self._discard(session)
        else:
            self._give_back(session)

    async def _session(
        self, baton: _Baton | None
    ) -> tuple[_Session, bool, pipelining.EnvelopeReplies | None] | Verdict:
        """A session (and whether it was used before, and the replies to our envelope if it
        came with them), or why there is none."""
        while True:
            taken = await self._take(baton)
            if isinstance(taken, Verdict):
                return taken
            if isinstance(taken, tuple):
                return taken[0], taken[1], None
            assert baton is not None  # HANDED
            handed = await baton.handed
            baton.claimed = True
            if handed is not None:
                return handed[0], True, handed[1]
            baton = None  # the session broke before our envelope was answered: another

    # -- chaining: the next message's envelope with this one's body -------------------------

    def _pick(self, session: _Session, hold: Hold) -> _Baton | None:
        """The next waiter for a session, if it can ride on this one (and the session is to
        stay open after this message): first those past the gate, then the gate's next."""
        if session.messages + 1 >= self._config.max_messages_per_connection:
            return None
        if self._over_share() or self._paused():  # paused: nobody new rides on its sessions
            return None
        while self._waiting and self._waiting[0][0].done():
            self._waiting.pop(0)  # gave up waiting
        # Past the gate first: the gate's next came later, and must not overtake them.
        baton = self._next_waiting() if self._waiting else self._slots.pass_on(hold, _Baton.live)
        if baton is not None:
            baton.picked = True
            if self._on_chained is not None:
                self._on_chained(self.relay.name)
        return baton

    def _paused(self) -> bool:
        return self._paused_by_name is not None and self._paused_by_name(self.relay.name)

    def _next_waiting(self) -> _Baton | None:
        """The first delivery waiting past the gate, woken to ride on this session; None when
        it has no envelope to carry (then it gets the session when it goes idle)."""
        waiter, baton = self._waiting[0]
        if baton is None or not baton.live():
            return None
        self._waiting.pop(0)
        waiter.set_result(None)
        return baton

    def _abandon(self, baton: _Baton) -> None:
        """A waiter that will not take what a carrier hands it: cancelled, or failed."""
        if not baton.handed.done():
            baton.handed.cancel()  # a carrier drops the session after its own message
        elif not baton.handed.cancelled() and (handed := baton.handed.result()) is not None:
            self._close_later(self._drop(handed[0]))  # the relay waits for our body

    # -- sessions ----------------------------------------------------------------------------

    async def _take(self, baton: _Baton | None = None) -> tuple[_Session, bool] | Verdict | object:
        now = time.monotonic()
        while True:
            if baton is not None and baton.picked:
                return HANDED
            while self._idle:
                session = self._idle.pop()
                if now - session.last_used < MAX_IDLE_S and session.smtp.is_connected:
                    return session, True
                await self._discard(session)
            lease = await self._lease(baton)
            if lease is OWN_SESSION_FREE:
                now = time.monotonic()
                continue  # one of our sessions finished its message first: reuse it
            if lease.full:
                return LIMIT_REACHED
            break
        try:
            smtp = await (self._connect_to or self._connect)(self.relay)
        except Exception as exc:
            await self._release(lease.member)
            verdict = classify_exception(exc)
            log.info("relay %s: connect failed: %s", self.relay.name, verdict.text)
            return verdict
        session = _Session(smtp, lease.member, last_used=time.monotonic())
        self._open.add(session)
        return session, False

    async def _connect(self, relay: RelayConfig) -> SmtpSession:
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            local_hostname=self._helo or None,
            timeout=self._config.command_timeout_s,
            start_tls=_start_tls(relay.tls),
            validate_certs=relay.tls_verify,
            cert_bundle=relay.tls_ca_file or None,
        )
        try:
            await smtp.connect(timeout=self._config.connect_timeout_s)
        except (ssl.SSLError, aiosmtplib.SMTPException) as exc:
            if relay.tls is not TlsPolicy.NONE and _is_tls_failure(exc):
                self._tls("failed", None)
            raise
        if relay.tls is TlsPolicy.REQUIRED or (
            relay.tls is TlsPolicy.OPPORTUNISTIC and smtp.get_transport_info("sslcontext")
        ):
            ssl_object = smtp.get_transport_info("ssl_object")
            self._tls("ok", ssl_object.version() if ssl_object is not None else None)
        _set_nodelay(smtp)
        if relay.username and relay.password is not None:
            try:
                await smtp.login(relay.username, relay.password)
            except BaseException:
                smtp.close()  # refused credentials: not a session the pool may keep or leak
                raise
        return smtp

    def _tls(self, result: str, version: str | None) -> None:
        if self._on_tls is not None:
            self._on_tls(self.relay.name, result, version)

    def _give_back(self, session: _Session) -> None:
        if session.messages >= self._config.max_messages_per_connection or self._over_share():
            self._close_later(self._discard(session))
        else:
            self._idle.append(session)
            self._wake_one()

    def _close_later(self, closing: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(closing)
        self._closing.add(task)  # close() waits for it: no socket left to the collector
        task.add_done_callback(self._closing.discard)

    def _wake_one(self) -> None:
        while self._waiting:
            waiter, _ = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def _over_share(self) -> bool:
        return self._share is not None and len(self._open) > self._share

    async def _discard(self, session: _Session) -> None:
        self._open.discard(session)
        # A deadline, not wait_for: wait_for runs QUIT as a task of its own, and when it is
        # cancelled as QUIT fails, nobody retrieves that failure ("never retrieved").
        try:
            with contextlib.suppress(Exception):
                if session.smtp.is_connected:
                    async with asyncio.timeout(QUIT_TIMEOUT_S):
                        await session.smtp.quit()
        finally:
            session.smtp.close()  # cancelled during QUIT too: no socket left open
        await self._release(session.lease)

    async def _drop(self, session: _Session) -> None:
        """Close without QUIT: the relay is inside a message, where QUIT would be its text."""
        self._open.discard(session)
        session.smtp.close()
        await self._release(session.lease)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._discard(s) for s in idle), *self._closing)

    async def reap_idle(self) -> None:
        """Close idle sessions past their idle limit (sooner when they hold a shared lease)."""
        now = time.monotonic()
        keep: list[_Session] = []
        stale: list[_Session] = []
        for session in self._idle:
            limit = SHARED_IDLE_S if session.lease else MAX_IDLE_S
            (stale if now - session.last_used >= limit else keep).append(session)
        self._idle = keep
        await asyncio.gather(*(self._discard(s) for s in stale))

    # -- cluster-wide limits -----------------------------------------------------------------

    async def _lease(self, baton: _Baton | None = None) -> Lease:
        """A cluster-wide connection lease, UNLIMITED when no shared limit applies, or FULL
        when none came free in time."""
        if self._limits is None:
            return UNLIMITED
        member = lease_member(self._owner, next(self._tokens))
        # Holding sessions of our own, we wait for one of them (each frees up after its
        # message) or a new lease, whichever comes first: at the cluster's limit that is the
        # normal case, not a reason to park. Holding none, the wait is short: mail that finds
        # the relay full is parked and back in seconds, not stuck behind the others.
        wait_s = self._config.connect_timeout_s if self._open else LEASE_WAIT_S
        deadline = time.monotonic() + min(self._config.connect_timeout_s, wait_s)
        while True:
            # Every session given back wakes all our waiters; one takes it, and the others
            # asked Redis for a lease at once, to be refused while the relay is full: 0.5 such
            # round trips per message with two workers. Once refused, this client asks again
            # only after a poll interval, and its waiters meanwhile wait for its own sessions.
            # The window is taken before asking: the waiters a wake-up finds here while the
            # question is out wait for our sessions instead of asking too.
            if time.monotonic() >= self._full_until:
                self._full_until = time.monotonic() + LIMIT_POLL_S
                try:
                    granted = await self._limits.acquire_connection(
                        self.relay.name,
                        member,
                        now_ms(),
                        self._lease_ttl_ms,
                        self.relay.max_connections,
                    )
                except LimitsUnavailable:
                    self._full_until = 0.0
                    return UNLIMITED  # Redis away: the per-node cap still holds
                if granted:
                    self._full_until = 0.0  # room at the relay: the next waiter may ask at once
                    return Lease(member)
            if time.monotonic() >= deadline:
                return FULL
            if await self._own_session_freed(LIMIT_POLL_S, baton):
                return OWN_SESSION_FREE

    async def _own_session_freed(self, timeout_s: float, baton: _Baton | None = None) -> bool:
        if not self._idle:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (waiter, baton)
            self._waiting.append(entry)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout_s):
                        await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
        return bool(self._idle) or (baton is not None and baton.picked)

    async def share_with_waiters(self) -> None:
        """Other owners wait for a lease: hold no more than our share, give back the rest as
        soon as each session finishes its message (idle ones now)."""
        if self._limits is None or not self._open:
            self._share = None
            return
        waiting = await self._limits.waiting_owners(self.relay.name, now_ms())
        others = len(waiting - {self._owner})
        self._share = max(1, self.relay.max_connections // (others + 1)) if others else None
        while self._idle and self._over_share():
            await self._discard(self._idle.pop(0))

    async def _release(self, lease: str | None) -> None:
        if lease and self._limits is not None:
            with contextlib.suppress(LimitsUnavailable):
                await self._limits.release_connection(self.relay.name, lease)

    async def refresh_leases(self) -> None:
        if self._limits is None:
            return
        for session in list(self._open):
            if session.lease:
                await self._limits.acquire_connection(
                    self.relay.name,
                    session.lease,
                    now_ms(),
                    self._lease_ttl_ms,
                    self.relay.max_connections,
                )

    async def _rate_slot(self, priority: int = 0) -> bool:
        limit = self.relay.max_messages_per_s
        if not limit or self._limits is None:
            return True
        deadline = time.monotonic() + self._config.command_timeout_s
        while True:
            now = time.time()
            try:
                if await self._limits.take_rate_slot(self.relay.name, int(now), limit):
                    return True
            except LimitsUnavailable:
                return True  # fail open: the per-node connection cap still bounds the rate
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(max(LIMIT_POLL_S, 1.0 - (now % 1.0)) + priority * CLASS_LAG_S)

    # -- one transaction -----------------------------------------------------------------------

    async def _transaction(
        self,
        session: _Session,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        envelope: pipelining.Envelope | None = None,
        replies: pipelining.EnvelopeReplies | None = None,
        handoff: _Handoff | None = None,
    ) -> dict[str, Verdict]:
        smtp = session.smtp
        if isinstance(smtp, aiosmtplib.SMTP) and smtp.is_ehlo_or_helo_needed:
            await smtp._ehlo_or_helo_if_needed()  # the relay's extensions, before the first MAIL
        if replies is not None or pipelining.can_pipeline(smtp):
            env = envelope if envelope is not None else _envelope(sender, recipients, data)
            return await self._pipelined(session, sender, recipients, data, env, replies, handoff)
        content = envelope.content if envelope is not None else mail_params.content(data)
        options = mail_params.options(_offered(session), content)
        refused = await _mail(smtp, sender, recipients, options)
        if refused is not None:
            return refused
        verdicts: dict[str, Verdict] = {}
        accepted = await _recipients(smtp, recipients, verdicts)
        if not accepted:
            await _reset(smtp)
            return verdicts
        try:
            response = await smtp.data(data)
            verdict = classify_reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as exc:
            verdict = classify_exception(exc)
        except aiosmtplib.SMTPServerDisconnected as exc:
            # aiosmtplib's DATA sends the message too: lost at the DATA command or after the
            # final dot, it cannot say which, so it counts as possibly stored.
            raise pipelining.ReplyLost(f"lost during DATA: {exc}") from exc
        except TimeoutError as exc:
            raise pipelining.ReplyTimedOut(f"no reply during DATA: {exc}") from exc
        verdicts.update(dict.fromkeys(accepted, verdict))
        session.messages += 1
        session.last_used = time.monotonic()
        return verdicts

    async def _pipelined(
        self,
        session: _Session,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        envelope: pipelining.Envelope | None,
        replies: pipelining.EnvelopeReplies | None,
        handoff: _Handoff | None,
    ) -> dict[str, Verdict]:
        """RFC 2920: the envelope in one write, the message in a second (with the next
        message's envelope when one waits for this session); exact verdicts."""
        smtp = session.smtp
        assert isinstance(smtp, aiosmtplib.SMTP)  # can_pipeline said so, or a handed session
        if envelope is None:  # as in the step-by-step path: nothing written, session untouched
            return dict.fromkeys(recipients, unsendable(sender, sender=True))
        if not envelope.rcpts:
            return envelope.unsendable
        exchange = await pipelining.transaction(
            smtp,
            envelope,
            data,
            self._config.command_timeout_s,
            replies=replies,
            successor=handoff,
            extensions=_offered(session),
        )
        if exchange.sent:
            session.messages += 1
            session.last_used = time.monotonic()
        if exchange.successor is not None and handoff is not None:
            closing = any(v.code == CLOSING_CODE for v in exchange.verdicts.values())
            usable = smtp.is_connected and not closing and _in_step(smtp)
            handoff.settle(exchange.replies, usable)
        elif not exchange.sent:
            await _reset(smtp)
        return exchange.verdicts


def _envelope(sender: str, recipients: Sequence[str], data: bytes) -> pipelining.Envelope | None:
    """The command lines of a message; None for a sender our client will not send."""
    try:
        return pipelining.envelope(sender, recipients, data)
    except ValueError:
        return None


def _offered(session: _Session) -> mail_params.Extensions:
    """What the session's relay offered for MAIL's parameters, read from its EHLO reply once
    (a session's extensions do not change); a scripted session (tests) offers nothing."""
    if session.extensions is None:
        smtp = session.smtp
        session.extensions = (
            mail_params.extensions(smtp.esmtp_extensions)
            if isinstance(smtp, aiosmtplib.SMTP)
            else mail_params.NO_EXTENSIONS
        )
    return session.extensions


async def _mail(
    smtp: SmtpSession, sender: str, recipients: Sequence[str], options: list[str]
) -> dict[str, Verdict] | None:
    """MAIL step by step: every recipient's verdict when it was refused, else None."""
    try:
        # Without options when there are none: the scripted sessions of tests take a sender only.
        await (smtp.mail(sender, options=options) if options else smtp.mail(sender))
    except aiosmtplib.SMTPResponseException as exc:
        if not positive(exc.code):  # aiosmtplib raises for any but 250
            await _reset(smtp)
            return dict.fromkeys(recipients, classify_exception(exc))
    except ValueError:
        # aiosmtplib refuses addresses that could inject into the command line, before
        # writing anything: the session is untouched and stays in the pool.
        return dict.fromkeys(recipients, unsendable(sender, sender=True))
    return None


async def _recipients(
    smtp: SmtpSession, recipients: Sequence[str], verdicts: dict[str, Verdict]
) -> list[str]:
    accepted = []
    for recipient in recipients:
        try:
            await smtp.rcpt(recipient)
        except aiosmtplib.SMTPRecipientRefused as exc:
            if positive(exc.code):  # aiosmtplib raises for any but 250 and 251
                accepted.append(recipient)
            else:
                verdicts[recipient] = classify_exception(exc)
        except ValueError:  # refused by our client before it wrote anything, as for MAIL
            verdicts[recipient] = unsendable(recipient, sender=False)
        else:
            accepted.append(recipient)
    return accepted


def _in_step(smtp: SmtpSession) -> bool:
    """Nothing read from the relay is left over. One that answers more than it was asked (two
    replies to the final dot, in one segment) had its extra replies taken as the next
    message's on this session: a stray `550` bounced a recipient the relay never refused."""
    leftover = getattr(getattr(smtp, "protocol", None), "_buffer", None)
    return not leftover


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError) or "tls" in str(exc).lower()


def _is_stale(exc: Exception) -> bool:
    """A session the relay had closed while it sat idle, found out before the message could
    have reached it; not one lost after its final dot, which the relay may have stored."""
    lost = isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError)
    return lost and not isinstance(exc, pipelining.ReplyLost)


def _start_tls(policy: TlsPolicy) -> bool | None:
    # aiosmtplib: None upgrades when the relay offers STARTTLS, True insists, False never tries.
    return {TlsPolicy.NONE: False, TlsPolicy.OPPORTUNISTIC: None, TlsPolicy.REQUIRED: True}[policy]


def _set_nodelay(smtp: aiosmtplib.SMTP) -> None:
    # Nagle plus delayed ACK costs ~40 ms per message on small writes (PEERS.md, Haraka).
    transport = smtp.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _reset(smtp: SmtpSession) -> None:
    """RSET, and close a session whose RSET is not answered 250: every relay answers it so
    (RFC 5321 §4.1.1.5), so anything else is a reply owed to an earlier command, read late
    (a relay that answered a final dot twice), and the session is a reply behind."""
    try:
        await smtp.rset()
    except aiosmtplib.SMTPException:
        smtp.close()


class RelayPool:
    """The node's relay clients: a RelayClient per relay, made on first use, and the upkeep
    of their sessions (idle reaping, refreshing the cluster-wide leases of open ones)."""

    def __init__(
        self,
        config: DeliveryConfig,
        helo: str,
        *,
        lease_ttl_s: float,
        limits: SharedLimits | None = None,
        owner: str = "",
        on_tls: Callable[[str, str, str | None], None] | None = None,
        on_chained: Callable[[str], None] | None = None,
        on_reply_lost: Callable[[str], None] | None = None,
        paused: Callable[[str], bool] | None = None,
    ) -> None:
        self._settings = SessionSettings(
            config,
            helo,
            lease_ttl_s,
            limits,
            owner,
            on_tls,
            on_chained,
            on_reply_lost=on_reply_lost,
            paused=paused,
        )
        self._clients: dict[str, RelayClient] = {}

    def client(self, relay: RelayConfig) -> RelayClient:
        client = self._clients.get(relay.name)
        if client is None:
            client = RelayClient(relay, self._settings)
            self._clients[relay.name] = client
        return client

    async def maintain_forever(self) -> None:
        """Reap idle sessions often; refresh the cluster-wide leases of open ones now and then."""
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(min(REAP_INTERVAL_S, self._settings.lease_ttl_s / 3))
            for client in list(self._clients.values()):
                await client.reap_idle()
                with contextlib.suppress(LimitsUnavailable):
                    await client.share_with_waiters()
            if time.monotonic() - last_refresh >= self._settings.lease_ttl_s / 3:
                last_refresh = time.monotonic()
                for client in list(self._clients.values()):
                    with contextlib.suppress(LimitsUnavailable):
                        await client.refresh_leases()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))
