"""A finished SMTP session is freed by reference counting, not left to the cycle collector.

With a new connection per message, sessions that only the collector could free piled up in
its oldest generation, and every full collection (about 20,000 objects, 35-50 ms on a busy
node) stalled all of the node's sessions at once. The collector is off while each case runs,
so a session still alive after its connection ended is one held by a reference cycle.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiosmtplib
import pytest

from smtpfleet.inbound.server import InboundSMTP
from smtpfleet.testing import eventually
from smtpfleet.testing.inbound import Front, inbound_front
from smtpfleet.testing.tls import TlsFiles

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"Subject: hi\r\nMessage-ID: <cycles@test>\r\n\r\nbody\r\n"


@pytest.fixture
async def front(certs: TlsFiles) -> AsyncIterator[Front]:
    settings = {
        "listen": ["127.0.0.1:0"],
        "accepted_domains": ["example.net"],
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
    }
    async with inbound_front(settings) as running:
        yield running


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _message_then_quit(client: aiosmtplib.SMTP) -> None:
    await client.sendmail("sender@example.com", ["rcpt@example.net"], MESSAGE)
    await client.quit()


async def _dropped_in_data(client: aiosmtplib.SMTP) -> None:
    await client.mail("sender@example.com")
    await client.rcpt("rcpt@example.net")
    await client.execute_command(b"DATA")
    assert isinstance(client.transport, asyncio.Transport)
    client.transport.abort()  # gone without a word: the session's task is cancelled


async def _starttls_then_message(client: aiosmtplib.SMTP) -> None:
    await client.starttls()
    await _message_then_quit(client)


CASES: dict[str, Callable[[aiosmtplib.SMTP], Awaitable[None]]] = {
    "message then QUIT": _message_then_quit,
    "client gone in DATA": _dropped_in_data,
    "STARTTLS, message, QUIT": _starttls_then_message,
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("no_collector")
async def test_a_finished_session_is_freed_without_the_cycle_collector(
    front: Front, certs: TlsFiles, case: str
) -> None:
    host, port = front.address()
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, tls_context=certs.client_context()
    )
    await client.connect()
    await client.ehlo()
    sessions: set[InboundSMTP] = front.server._sessions
    (session,) = sessions
    alive = weakref.ref(session)
    del session
    await CASES[case](client)
    client.close()
    await eventually(lambda: not sessions, timeout_s=10)
    await asyncio.sleep(0)  # the session task's last callbacks
    await eventually(lambda: alive() is None, timeout_s=5)
