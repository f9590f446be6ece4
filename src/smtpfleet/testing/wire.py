"""A raw SMTP client for tests: the exact bytes and codes on the wire, every read bounded.

Not an SMTP library on purpose: the point is what the server sends after a smuggling attempt,
pipelined input, a PROXY header or a STARTTLS upgrade, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, Final, Self

WAIT_S: Final = 5.0


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: tuple[str, int], **kwargs: Any) -> Self:
        return cls(*await asyncio.open_connection(*address, **kwargs))

    async def reply(self) -> str:
        """One whole reply (multi-line replies joined); "<closed>" when the server closed."""
        lines: list[str] = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), WAIT_S)).decode()
            if not line:
                return "".join(lines) or "<closed>"
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    def send(self, line: str | bytes) -> None:
        """Bytes as they are; a str as one command line (CRLF added)."""
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")

    async def cmd(self, line: str | bytes) -> str:
        self.send(line)
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="localhost")

    async def closed(self) -> bool:
        """True when the server closes the connection (EOF) within WAIT_S."""
        with contextlib.suppress(ConnectionError):
            rest = await asyncio.wait_for(self.reader.read(), WAIT_S)
            return rest == b""
        return True

    async def said_nothing(self) -> bool:
        """True when the server closed without a byte (a reset over unread input counts)."""
        try:
            return await asyncio.wait_for(self.reader.read(), WAIT_S) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
