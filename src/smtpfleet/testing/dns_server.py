"""A tiny authoritative DNS server on loopback, for testing `check-dns` against real DNS.

Zones are given as {name: {rdtype: (ttl, [rdata text, ...])}}, parsed by dnspython's own
rdata code. The server answers over UDP and TCP on the same port: NXDOMAIN for unknown
names, an empty answer for a known name without that type, and a truncated (TC) UDP answer
when the response does not fit the client's payload size, as real servers do (RFC 1035
§4.2.1, RFC 6891 §6.2.3), so long DKIM keys exercise the resolver's TCP fallback.

No new dependency: dnspython is already one of smtpfleet's.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Mapping, Sequence
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = Mapping[str, Mapping[str, tuple[int, Sequence[str]]]]
_UDP_DEFAULT_PAYLOAD = 512  # without EDNS (RFC 1035 §4.2.1)


def _answer(zone: Zone, data: bytes) -> dns.message.Message | None:
    try:
        query = dns.message.from_wire(data)
    except dns.exception.DNSException:  # garbage in: no answer, like a real server
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if not query.question:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    question = query.question[0]
    records = zone.get(question.name.to_text(omit_final_dot=True).lower())
    if records is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    rdtype = dns.rdatatype.to_text(question.rdtype)
    if rdtype in records:
        ttl, values = records[rdtype]
        rrset = dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN, rdtype, values)
        response.answer.append(rrset)
    return response


def _udp_wire(response: dns.message.Message) -> bytes:
    limit = max(response.request_payload, _UDP_DEFAULT_PAYLOAD)
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC  # "ask again over TCP"
        return response.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._server.udp_queries += 1
        response = None if self._server.silent else _answer(self._server.zone, data)
        if response is not None and self.transport is not None:
            self.transport.sendto(_udp_wire(response), addr)


class DnsServer:
    """`async with DnsServer(zone) as server:` then ask 127.0.0.1, port `server.port`.

    `silent=True` swallows every query, for testing timeouts.
    """

    def __init__(self, zone: Zone, host: str = "127.0.0.1", *, silent: bool = False) -> None:
        self.zone = {name.rstrip(".").lower(): records for name, records in zone.items()}
        self.host = host
        self.silent = silent
        self.port = 0
        self.udp_queries = 0
        self.tcp_queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # the UDP port picked by the OS may be taken for TCP: try again
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, 0)
            )
            port: int = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return self
        raise OSError("no port free for both UDP and TCP on " + self.host)

    async def __aexit__(self, *exc: object) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self.silent:
                # Each TCP message is preceded by its two-byte length (RFC 1035 §4.2.2).
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                self.tcp_queries += 1
                response = _answer(self.zone, await reader.readexactly(length))
                if response is None:
                    break
                wire = response.to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client is done
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
