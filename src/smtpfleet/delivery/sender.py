"""Pooled SMTP sessions to the relays (aiosmtplib): many messages per connection.

One `RelayClient` per relay holds idle sessions and caps how many are open at once. A message
is sent as MAIL, one RCPT per recipient, DATA: so every recipient gets its own verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from smtpfleet.config import DeliveryConfig, RelayConfig, TlsPolicy
from smtpfleet.delivery.classify import Verdict, classify_exception, classify_reply

log = logging.getLogger(__name__)

# Relays commonly drop sessions idle for a minute or more; reconnecting before that costs less
# than discovering a dead session on the next message.
MAX_IDLE_S = 30.0
CLOSING_CODE = 421


@dataclass
class _Session:
    smtp: aiosmtplib.SMTP
    messages: int = 0
    last_used: float = 0.0


class RelayClient:
    """Sessions to one relay."""

    def __init__(self, relay: RelayConfig, config: DeliveryConfig, helo: str) -> None:
        self.relay = relay
        self._config = config
        self._helo = helo
        self._idle: list[_Session] = []
        self._slots = asyncio.Semaphore(relay.max_connections)

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Verdict]:
        """Per-recipient verdicts. Never raises for relay trouble: that is a verdict too."""
        async with self._slots:
            for _ in range(2):
                session, reused = await self._take()
                if session is None:
                    return dict.fromkeys(recipients, self._connect_error)
                try:
                    verdicts = await self._transaction(session, sender, recipients, data)
                except asyncio.CancelledError:
                    session.smtp.close()  # cut off mid-transaction: this session is unusable
                    raise
                except Exception as exc:
                    await self._discard(session)
                    if reused and self._is_stale(exc):
                        continue  # the relay closed an idle session: try a fresh one at once
                    return dict.fromkeys(recipients, classify_exception(exc))
                if any(v.code == CLOSING_CODE for v in verdicts.values()):
                    await self._discard(session)  # 421: the relay is closing this session
                else:
                    self._give_back(session)
                return verdicts
        return dict.fromkeys(recipients, self._connect_error)

    @staticmethod
    def _is_stale(exc: Exception) -> bool:
        return isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError)

    async def _take(self) -> tuple[_Session | None, bool]:
        now = time.monotonic()
        while self._idle:
            session = self._idle.pop()
            if now - session.last_used < MAX_IDLE_S and session.smtp.is_connected:
                return session, True
            await self._discard(session)
        try:
            return _Session(await self._connect()), False
        except Exception as exc:
            self._connect_error = classify_exception(exc)
            log.info("relay %s: connect failed: %s", self.relay.name, self._connect_error.text)
            return None, False

    async def _connect(self) -> aiosmtplib.SMTP:
        relay = self.relay
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            local_hostname=self._helo or None,
            timeout=self._config.command_timeout_s,
            start_tls=_start_tls(relay.tls),
            validate_certs=relay.tls_verify,
        )
        await smtp.connect(timeout=self._config.connect_timeout_s)
        _set_nodelay(smtp)
        if relay.username and relay.password is not None:
            await smtp.login(relay.username, relay.password)
        return smtp

    async def _transaction(
        self, session: _Session, sender: str, recipients: Sequence[str], data: bytes
    ) -> dict[str, Verdict]:
        smtp = session.smtp
        verdicts: dict[str, Verdict] = {}
        try:
            await smtp.mail(sender)
        except aiosmtplib.SMTPResponseException as exc:
            await _reset(smtp)
            return dict.fromkeys(recipients, classify_exception(exc))
        accepted = await self._recipients(smtp, recipients, verdicts)
        if not accepted:
            await _reset(smtp)
            return verdicts
        try:
            response = await smtp.data(data)
            verdict = classify_reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as exc:
            verdict = classify_exception(exc)
        verdicts.update(dict.fromkeys(accepted, verdict))
        session.messages += 1
        session.last_used = time.monotonic()
        return verdicts

    @staticmethod
    async def _recipients(
        smtp: aiosmtplib.SMTP, recipients: Sequence[str], verdicts: dict[str, Verdict]
    ) -> list[str]:
        accepted = []
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                verdicts[recipient] = classify_exception(exc)
            else:
                accepted.append(recipient)
        return accepted

    def _give_back(self, session: _Session) -> None:
        if session.messages >= self._config.max_messages_per_connection:
            asyncio.get_running_loop().create_task(self._discard(session))
        else:
            self._idle.append(session)

    async def _discard(self, session: _Session) -> None:
        with contextlib.suppress(Exception):
            if session.smtp.is_connected:
                await asyncio.wait_for(session.smtp.quit(), timeout=2.0)
        session.smtp.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._discard(s) for s in idle))

    _connect_error: Verdict = classify_reply(421, "4.4.1 no relay session could be opened")


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


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException):
        await smtp.rset()


class Sender:
    """A RelayClient per relay, made on first use."""

    def __init__(self, config: DeliveryConfig, helo: str) -> None:
        self._config = config
        self._helo = helo
        self._clients: dict[str, RelayClient] = {}

    def client(self, relay: RelayConfig) -> RelayClient:
        client = self._clients.get(relay.name)
        if client is None:
            client = self._clients[relay.name] = RelayClient(relay, self._config, self._helo)
        return client

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))
