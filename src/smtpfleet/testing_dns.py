"""A tiny authoritative DNS server on loopback, for testing `check-dns` against real DNS.

Zones are given as {name: {rdtype: (ttl, [rdata text, ...])}}; the server answers over UDP
with dnspython's own message code, NXDOMAIN for unknown names, an empty answer for a known
name without that type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = Mapping[str, Mapping[str, tuple[int, Sequence[str]]]]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self._zone = {name.rstrip(".").lower(): records for name, records in zone.items()}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # garbage in: no answer, like a real server
            return
        assert self.transport is not None
        self.transport.sendto(self._answer(query).to_wire(), addr)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        records = self._zone.get(name)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if rdtype in records:
            ttl, values = records[rdtype]
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name, ttl, dns.rdataclass.IN, rdtype, list(values)
                )
            )
        return response


class DnsServer:
    def __init__(self, zone: Zone, host: str = "127.0.0.1") -> None:
        self._zone = zone
        self.host = host
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._zone), local_addr=(self.host, 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
