"""Whom a PROXY header may speak for, and whom it names (pure)."""

from __future__ import annotations

import asyncio

from aiosmtpd.proxy_protocol import get_proxy

from smtpfleet.inbound.proxy import client_of, in_networks, networks


async def _parse(header: bytes) -> object:
    reader = asyncio.StreamReader()
    reader.feed_data(header)
    reader.feed_eof()
    return await get_proxy(reader)


def test_trusted_networks_include_ipv4_mapped_peers() -> None:
    trusted = networks(["10.0.0.0/8"])
    assert in_networks("10.1.2.3", trusted)
    assert in_networks("::ffff:10.1.2.3", trusted)
    assert not in_networks("11.0.0.1", trusted)
    assert not in_networks("not an address", trusted)


async def test_v1_names_its_source() -> None:
    data = await _parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 25\r\n")
    assert client_of(data) == ("198.51.100.7", 40000)  # type: ignore[arg-type]


async def test_v1_unknown_names_nobody() -> None:
    data = await _parse(b"PROXY UNKNOWN\r\n")
    assert client_of(data) is None  # type: ignore[arg-type]
