"""Reading one message after DATA: up to the final dot, unstuffed, within its limits.

RFC 5321 §4.1.1.4: the data ends with a line holding only a dot; §4.5.2: a line that starts
with a dot had one more dot added by the client. The reader used to take one line per read
(a message of 30 lines was 30 calls into the stream reader, 6 % of a node's CPU). It now
reads up to the next `.<CRLF>`, the only place the message can end: a whole message usually
comes in one read, and every line of it is checked and unstuffed at once, in C.
"""

from __future__ import annotations

import asyncio

from smtpfleet import replies
from smtpfleet.inbound.budget import ByteBudget

DOT_LINE_END = b".\r\n"  # the end of the final line, or of a line that ends with a dot
FINAL_DOT_AFTER_LINE = b"\r\n.\r\n"


class MessageData:
    """One message being read: a single buffer, its bytes held in the node's budget."""

    def __init__(self, budget: ByteBudget, size_limit: int, line_limit: int) -> None:
        self._budget = budget
        self._size_limit = size_limit
        self._line_limit = line_limit  # CRLF included, as the stream reader's limit
        self._buffer = bytearray()
        self._held = 0
        self._size = 0
        self.refusal: str | None = None  # the reply after the final dot, when refused

    async def read(self, reader: asyncio.StreamReader) -> None:
        """Up to and including the final dot, storing what is still wanted.

        Every read ends at a line's end, so the next one starts a line: where the final dot
        can be. A read ends at the next `.<CRLF>` (the final dot, or a line ending in a dot);
        when that is beyond the reader's limit, it takes what surely comes before it, and then
        the rest of that line.
        """
        while True:
            try:
                block = await reader.readuntil(DOT_LINE_END)
            except asyncio.LimitOverrunError as overrun:
                block = await reader.read(overrun.consumed)
                if not block.endswith(b"\r\n"):
                    rest = await self._rest_of_line(reader)
                    if rest is None:  # too long: refused, and never the final dot
                        self._size += len(block)
                        continue
                    block += rest
            if block == DOT_LINE_END or block.endswith(FINAL_DOT_AFTER_LINE):
                self._store(block[: -len(DOT_LINE_END)])
                return
            self._store(block)

    async def _rest_of_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """Up to the line's CRLF; None when the line is longer than the reader's limit (the
        message is then refused, and the line read through to its end)."""
        try:
            return await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as overrun:
            self._size += len(await reader.read(overrun.consumed))
            self._refuse(replies.LINE_TOO_LONG)
        while True:
            try:
                self._size += len(await reader.readuntil(b"\r\n"))
                return None
            except asyncio.LimitOverrunError as overrun:
                self._size += len(await reader.read(overrun.consumed))

    def _store(self, lines: bytes) -> None:
        """Whole lines, CRLF-ended, the first at the start of a line."""
        if not lines:
            return
        if self.refusal is not None:
            self._size += len(lines)
            return  # refused already: read on to the final dot, keep nothing
        if max(map(len, lines.split(b"\r\n"))) + 2 > self._line_limit:
            self._size += len(lines)
            self._refuse(replies.LINE_TOO_LONG)
            return
        # The size is the message's, without the dots the client doubled (RFC 1870 §6.1's
        # "message size"): a message of dot-led lines under the limit is not refused for them.
        unstuffed = (lines[1:] if lines[:1] == b"." else lines).replace(b"\r\n.", b"\r\n")
        self._size += len(unstuffed)
        if self._size_limit and self._size > self._size_limit:
            self._refuse(replies.MESSAGE_TOO_BIG)
        elif not self._budget.take(len(lines)):
            self._refuse(replies.NO_ROOM)
        else:
            self._held += len(lines)
            self._buffer += unstuffed

    def _refuse(self, reply: str) -> None:
        if self.refusal is None:
            self.refusal = reply
        self._buffer = bytearray()
        self.release()

    def take(self) -> bytes:
        """The message, unstuffed; the buffer is freed (the budget is held until release)."""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    def release(self) -> None:
        self._budget.release(self._held)
        self._held = 0
