"""Whom a PROXY header may speak for, and whom it names (pure)."""

from __future__ import annotations

import asyncio
import struct

import pytest
from aiosmtpd.proxy_protocol import V2_SIGNATURE, get_proxy

from smtpfleet.inbound.proxy import client_of, in_networks, networks, well_formed

ADDRESSES = bytes([198, 51, 100, 7, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 25)


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


def _v2(tlvs: bytes) -> bytes:
    body = ADDRESSES + tlvs
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def _tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value) if length is None else length) + value


@pytest.mark.parametrize(
    "tlvs",
    [
        b"",
        _tlv(0x04, b"\0\0"),  # PP2_TYPE_NOOP, HAProxy's padding
        _tlv(0x01, b"smtp") + _tlv(0x04, b""),  # ALPN, then an empty NOOP
    ],
)
async def test_v2_tlvs_that_fill_the_header_are_whole(tlvs: bytes) -> None:
    data = await _parse(_v2(tlvs))
    assert well_formed(data)  # type: ignore[arg-type]
    assert client_of(data) == ("198.51.100.7", 40000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tlvs",
    [
        _tlv(0x04, b"\0\0", length=200),  # runs past the header's end
        _tlv(0x04, b"") + b"\x04\x00",  # a TLV cut inside its own length
        b"\x01",  # a type and nothing more
    ],
)
async def test_v2_tlvs_that_run_past_the_header_are_not(tlvs: bytes) -> None:
    data = await _parse(_v2(tlvs))
    assert data  # aiosmtpd takes it as valid: the TLVs are ours to check
    assert not well_formed(data)  # type: ignore[arg-type]


async def test_v1_and_v2_without_tlvs_are_whole() -> None:
    assert well_formed(await _parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 25\r\n"))  # type: ignore[arg-type]
    assert well_formed(await _parse(_v2(b"")))  # type: ignore[arg-type]
