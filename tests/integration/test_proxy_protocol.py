"""PROXY protocol v1/v2 on loopback: trusted proxies name the client; nobody else can."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

import pytest

from smtpfleet import replies
from smtpfleet.testing.client import eventually
from smtpfleet.testing.inbound import inbound_front
from smtpfleet.testing.tls import make_tls_files
from smtpfleet.testing.wire import Wire

pytestmark = pytest.mark.timeout(60)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MESSAGE = b"Subject: hi\r\nMessage-ID: <proxy@test>\r\n\r\nbody\r\n.\r\n"
PROXIES = "smtpfleet_proxy_headers_total"


def v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    target = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {target} {port} 25\r\n".encode()


def v2(source: str, port: int = 40000, *, local: bool = False) -> bytes:
    ip = ipaddress.ip_address(source)
    if ip.version == 4:
        family, body = 0x11, ip.packed + ipaddress.IPv4Address("127.0.0.1").packed
    else:
        family, body = 0x21, ip.packed + ipaddress.IPv6Address("::1").packed
    body += struct.pack("!HH", port, 25)
    return (
        V2_SIGNATURE
        + bytes([0x20 if local else 0x21, family])
        + struct.pack("!H", len(body))
        + body
    )


def settings(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "listen": [],
        "listeners": [{"address": "127.0.0.1:0", "proxy_protocol": True}],
        "trusted_proxies": ["127.0.0.1/32", "::1/128"],
        "accepted_domains": ["example.net"],
        # Loopback may relay: a proxied client must not inherit that.
        "relay_networks": ["127.0.0.0/8", "192.0.2.0/24"],
    }
    return base | extra


async def relay_attempt(wire: Wire) -> str:
    """EHLO, MAIL, and a RCPT to a domain that is not ours: the relay check's verdict."""
    await wire.cmd("EHLO proxied.test")
    await wire.cmd("MAIL FROM:<s@example.com>")
    return await wire.cmd("RCPT TO:<someone@foreign.example>")


@pytest.mark.parametrize("header", [v1, v2])
async def test_proxied_client_address_is_the_one_judged(header: Any) -> None:
    async with inbound_front(settings()) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(header("198.51.100.7"))
        assert (await wire.reply()).startswith("220 ")
        # The connection comes from 127.0.0.1 (a relay network); the client is not.
        assert await relay_attempt(wire) == replies.RELAY_DENIED + "\r\n"
        await wire.close()
        assert front.sample(PROXIES, {"result": "ok"}) == 1


@pytest.mark.parametrize("header", [v1, v2])
async def test_proxied_client_in_relay_networks_relays_and_is_in_received(header: Any) -> None:
    async with inbound_front(settings()) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(header("192.0.2.9"))
        await wire.reply()
        assert (await relay_attempt(wire)).startswith("250 2.1.5")
        assert (await wire.cmd("DATA")).startswith("354")
        assert (await wire.cmd(MESSAGE)).startswith("250 2.0.0")
        await wire.close()
        assert front.spool.messages[0].data.startswith(b"Received: from proxied.test ([192.0.2.9])")


async def test_proxied_ipv6_client_v2() -> None:
    async with inbound_front(settings()) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(v2("2001:db8::5"))
        await wire.reply()
        assert await relay_attempt(wire) == replies.RELAY_DENIED + "\r\n"
        await wire.close()


async def test_v2_local_is_the_proxy_itself() -> None:
    async with inbound_front(settings()) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(v2("198.51.100.7", local=True))
        assert (await wire.reply()).startswith("220 ")
        assert (await relay_attempt(wire)).startswith("250")  # 127.0.0.1: a relay network
        await wire.close()
        assert front.sample(PROXIES, {"result": "local"}) == 1


async def test_untrusted_peer_is_closed_before_the_banner() -> None:
    async with inbound_front(settings(trusted_proxies=["10.0.0.0/8"])) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(v1("192.0.2.9"))
        assert await wire.said_nothing()
        await wire.close()
        assert front.sample(PROXIES, {"result": "untrusted"}) == 1
        assert front.server.active_sessions == 0


async def test_missing_or_broken_header_is_closed_before_the_banner() -> None:
    async with inbound_front(settings()) as front:
        for opening in (b"EHLO direct.test\r\n", b"PROXY TCP4 nonsense\r\n"):
            wire = await Wire.open(front.address())
            wire.writer.write(opening)
            assert await wire.said_nothing()
            await wire.close()
        assert front.sample(PROXIES, {"result": "invalid"}) == 2


async def test_a_v2_header_whose_tlv_runs_past_its_end_is_closed_before_the_banner() -> None:
    # A TLV (NOOP, 0x04) claiming 200 bytes where 2 follow: aiosmtpd reads the addresses and
    # leaves the TLVs unread, so without our check the named client was believed.
    header = v2("192.0.2.7")
    broken = header[:14] + struct.pack("!H", len(header) - 16 + 5) + header[16:]
    async with inbound_front(settings()) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(broken + bytes([0x04]) + struct.pack("!H", 200) + b"\0\0")
        assert await wire.said_nothing()
        await wire.close()
        assert front.sample(PROXIES, {"result": "invalid"}) == 1
        assert front.sample(PROXIES, {"result": "ok"}) == 0


async def test_a_load_balancers_tcp_check_frees_its_session() -> None:
    """The balancer's health check connects and closes without a header. Its end-of-file
    cancelled the session while it waited for the header, before the banner, where nothing
    closed the connection (aiosmtpd keeps it half open): every check kept a descriptor and
    a session for good, until `max_sessions` refused all mail."""
    async with inbound_front(settings(max_sessions=5)) as front:
        for _ in range(20):
            _reader, writer = await asyncio.open_connection(*front.address())
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: front.server.active_sessions == 0, timeout_s=5.0)
        wire = await Wire.open(front.address())
        wire.writer.write(v1("198.51.100.7"))
        assert (await wire.reply()).startswith("220 ")  # not refused for capacity
        await wire.close()


async def test_silent_client_is_closed_after_the_proxy_timeout() -> None:
    async with inbound_front(settings(proxy_timeout_s=0.3)) as front:
        wire = await Wire.open(front.address())
        assert await wire.said_nothing()
        await wire.close()


async def test_proxy_line_on_a_plain_listener_is_an_unknown_command() -> None:
    plain = settings(listen=["127.0.0.1:0"], listeners=[], relay_networks=["192.0.2.0/24"])
    async with inbound_front(plain) as front:
        wire = await Wire.open(front.address())
        assert (await wire.reply()).startswith("220 ")
        assert await wire.cmd(v1("192.0.2.9")) == replies.UNKNOWN_COMMAND + "\r\n"
        # The spoofed 192.0.2.9 (a relay network) was not believed: 127.0.0.1 is not one.
        assert await relay_attempt(wire) == replies.RELAY_DENIED + "\r\n"
        await wire.close()


async def test_proxied_address_survives_starttls(tmp_path: Any) -> None:
    certs = make_tls_files(tmp_path / "tls")
    tls = {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}
    async with inbound_front(settings(tls=tls)) as front:
        wire = await Wire.open(front.address())
        wire.writer.write(v1("198.51.100.7"))
        await wire.reply()
        await wire.cmd("EHLO proxied.test")
        assert (await wire.cmd("STARTTLS")).startswith("220")
        await wire.writer.start_tls(certs.client_context(), server_hostname="localhost")
        assert await relay_attempt(wire) == replies.RELAY_DENIED + "\r\n"
        await wire.close()
