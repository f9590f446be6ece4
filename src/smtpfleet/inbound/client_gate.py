"""Each session's per-client limits: counted at connect, checked at MAIL and at each RCPT.

`ClientGates` belongs to the server: it knows the limits, who is exempt, and the counter (this
node's, or the cluster's through Redis). Each session gets a `ClientGate`, which wraps
aiosmtpd's MAIL and RCPT hooks, so the handler stays about senders, recipients and the spool.
The counts come from the `ClientCounter`; the decisions are inbound/limits.py.

Cost per message: one count at MAIL (one Redis round trip), none at RCPT. A RCPT is judged
against the recipients counted at its MAIL plus those this session accepted since; they are
counted with the session's next MAIL, or when it ends.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from smtpfleet.config import InboundLimitsConfig
from smtpfleet.inbound.counters import ClientCounter
from smtpfleet.inbound.limits import (
    ClientLimits,
    Limit,
    client_key,
    mail_refusal,
    rcpt_refusal,
    session_refusal,
)
from smtpfleet.inbound.proxy import Network, in_networks
from smtpfleet.metrics import Metrics

log = logging.getLogger(__name__)

Hook = Callable[..., Awaitable[Any]]
Repeat = Callable[[Any, str], bool]  # (envelope, address): see ClientGate.guard
RELEASE_WAIT_S: Final = 2.0  # close(): how long the last sessions' releases may take
CLIENTS_KEPT: Final = 4096  # client addresses whose key (or exemption) is kept


class ClientGates:
    """The server's side: which clients are limited, the counter, and the releases."""

    def __init__(
        self,
        config: InboundLimitsConfig,
        counter: ClientCounter,
        relay_networks: Iterable[Network],
        metrics: Metrics,
    ) -> None:
        self.limits = ClientLimits.from_config(config)
        self._counter = counter
        self._exempt = tuple(relay_networks) if config.exempt_relay_networks else ()
        self._ipv6_prefix_length = config.ipv6_prefix_length
        self._metrics = metrics
        self._tokens = itertools.count(1)
        self._releases: set[asyncio.Task[None]] = set()
        # Asked at every connection; parsing the address (twice: exemption, then key) cost
        # about as much as the rest of the gate. The answer is kept per address.
        self.client = functools.lru_cache(maxsize=CLIENTS_KEPT)(self._client)

    def new(self) -> ClientGate:
        return ClientGate(self, self._counter, str(next(self._tokens)))

    def _client(self, address: str) -> str | None:
        """What a client at `address` is counted as; None when it is not limited."""
        if not self.limits.enabled or in_networks(address, self._exempt):
            return None
        return client_key(address, self._ipv6_prefix_length)

    def refused(self, limit: Limit, client: str) -> None:
        log.info("%s: over its %s limit, refused", client, limit)
        self._metrics.client_limit_refusals.labels(str(limit)).inc()

    def release(self, gate: ClientGate) -> None:
        """The session ended: its count is given back without holding up the caller."""
        if not gate.counted:
            return
        task = asyncio.ensure_future(gate.close())
        self._releases.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("client limits: a session's release failed: %r", task.exception())

    async def close(self) -> None:
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=RELEASE_WAIT_S)


class ClientGate:
    """One session's client: counted once admitted, until it ends."""

    def __init__(self, gates: ClientGates, counter: ClientCounter, token: str) -> None:
        self._gates = gates
        self._counter = counter
        self._token = token
        self._client: str | None = None  # None: not counted (exempt, unlimited, not admitted)
        self._pending = 0  # recipients accepted and not counted yet
        self._at_mail = 0.0  # the client's recipients of the last minute, as counted at MAIL
        self._since_mail = 0  # recipients accepted in this transaction

    @property
    def counted(self) -> bool:
        return self._client is not None

    async def admit(self, address: str) -> str | None:
        """Count this session; the reply instead of the banner when it is one too many."""
        self._client = self._gates.client(address)
        if self._client is None:
            return None
        sessions = await self._counter.open_session(self._client, self._token)
        refusal = session_refusal(sessions, self._gates.limits)
        if refusal is not None:
            self._gates.refused(Limit.SESSIONS, self._client)
        return refusal

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._counter.close_session(client, self._token, self._pending)

    async def mail(self) -> str | None:
        if self._client is None:
            return None
        usage = await self._counter.add_message(self._client, self._pending)
        self._pending, self._since_mail, self._at_mail = 0, 0, usage.recipients
        refused = mail_refusal(usage, self._gates.limits)
        if refused is None:
            return None
        self._gates.refused(refused[0], self._client)
        return refused[1]

    def rcpt(self) -> str | None:
        if self._client is None:
            return None
        refusal = rcpt_refusal(self._at_mail, self._since_mail, self._gates.limits)
        if refusal is not None:
            self._gates.refused(Limit.RECIPIENTS, self._client)
        return refusal

    def accepted(self) -> None:
        if self._client is not None:
            self._pending += 1
            self._since_mail += 1

    def guard(self, hooks: dict[str, Hook], accepted_already: Repeat | None = None) -> None:
        """Put the limits in front of aiosmtpd's MAIL and RCPT hooks (the handler's).

        `accepted_already(envelope, address)`: a RCPT the transaction holds already, which
        the handler takes once. It is neither limited nor counted: a 451 for it would have
        the client send it again in a transaction of its own, a second delivery."""
        if "MAIL" in hooks:
            hooks["MAIL"] = self._guard_mail(hooks["MAIL"])
        if "RCPT" in hooks:
            hooks["RCPT"] = self._guard_rcpt(hooks["RCPT"], accepted_already)

    def _guard_mail(self, hook: Hook) -> Hook:
        async def mail(*args: Any) -> Any:
            refusal = await self.mail()
            return refusal if refusal is not None else await hook(*args)

        return mail

    def _guard_rcpt(self, hook: Hook, accepted_already: Repeat | None) -> Hook:
        async def rcpt(*args: Any) -> Any:
            # aiosmtpd calls hook(server, session, envelope, address, options)
            if accepted_already is not None and accepted_already(args[2], args[3]):
                return await hook(*args)
            refusal = self.rcpt()
            if refusal is not None:
                return refusal
            reply = await hook(*args)
            if isinstance(reply, str) and reply.startswith("250"):
                self.accepted()
            return reply

        return rcpt
