"""Reading one message after DATA: up to the final dot, unstuffed, within its limits.

RFC 5321 §4.1.1.4: the data ends with a line holding only a dot; §4.5.2: a line that starts
with a dot had one more dot added by the client. The reader used to take one line per read
(a message of 30 lines was 30 calls into the stream reader, 6 % of a node's CPU). It now
reads up to the next `.<CRLF>`, the only place the message can end: a whole message usually
comes in one read, and every line of it is checked and unstuffed at once, in C.

A line longer than RFC 5322's 998 octets is taken, not refused (RFC 5321 §4.5.3.1: "no
limits" where possible; generated HTML often has such lines): it is folded, CRLF and a space
inserted after each 998 octets, as Sendmail, Haraka and Postfix's SMTP client fold it. Folded
here, before the message is queued, the bytes a DKIM signature covers are the bytes relays
send on, which no relay then folds again.
"""

from __future__ import annotations

import asyncio

from smtpfleet import replies
from smtpfleet.inbound.budget import ByteBudget

DOT_LINE_END = b".\r\n"  # the end of the final line, or of a line that ends with a dot
FINAL_DOT_AFTER_LINE = b"\r\n.\r\n"
FOLD_AT = 998  # octets of a line, its CRLF not counted (RFC 5322 §2.1.1)
FOLD = b"\r\n "


class MessageData:
    """One message being read: a single buffer, its bytes held in the node's budget."""

    def __init__(self, budget: ByteBudget, size_limit: int) -> None:
        self._budget = budget
        self._size_limit = size_limit
        self._buffer = bytearray()
        self._held = 0
        self._size = 0
        self._line_start = True  # the next byte starts a line (the last piece ended one)
        self._column = 0  # octets of the line being stored, as folded
        self.folded = 0  # folds inserted: lines longer than FOLD_AT
        self.refusal: str | None = None  # the reply after the final dot, when refused

    async def read(self, reader: asyncio.StreamReader) -> None:
        """Up to and including the final dot, storing what is still wanted.

        A read ends at the next `.<CRLF>` (the final dot, or a line that ends with a dot).
        When that is beyond the reader's limit, it takes what surely comes before it and the
        rest of that line, or of a line longer than the limit what surely comes before its
        end. A CR that ends such a piece waits for the next one: it may be half a CRLF.
        """
        carry = b""
        while True:
            try:
                block = carry + await reader.readuntil(DOT_LINE_END)
            except asyncio.LimitOverrunError as overrun:
                block = carry + await reader.read(overrun.consumed)
                if not block.endswith((b"\r\n", b"\r")):
                    block += await _rest_of_line(reader)
                carry = b"\r" if block.endswith(b"\r") else b""
                self._store(block[: len(block) - len(carry)])
                continue
            if block.endswith(FINAL_DOT_AFTER_LINE) or (block == DOT_LINE_END and self._line_start):
                self._store(block[: -len(DOT_LINE_END)])
                return
            carry = b""
            self._store(block)

    def _store(self, piece: bytes) -> None:
        """The message's next bytes, which start where the last piece ended."""
        if not piece:
            return
        line_start, self._line_start = self._line_start, piece.endswith(b"\r\n")
        if self.refusal is not None:
            self._size += len(piece)  # refused already: read on to the final dot, keep nothing
        elif line_start and self._line_start and _no_long_line(piece):
            # Whole lines, none to fold (nearly every message): unstuffed at once, in C.
            unstuffed = (piece[1:] if piece[:1] == b"." else piece).replace(b"\r\n.", b"\r\n")
            self._keep(unstuffed, len(unstuffed))
        else:
            self._keep(*self._unstuffed_and_folded(piece, line_start))

    def _unstuffed_and_folded(self, piece: bytes, line_start: bool) -> tuple[bytes, int]:
        """The piece unstuffed and folded, and its size without the folds."""
        parts: list[bytes] = []
        size = 0
        column = self._column
        lines = piece.split(b"\r\n")
        for index, line in enumerate(lines):
            if index:
                parts.append(b"\r\n")
                size += 2
                column = 0
            if (index or line_start) and line[:1] == b".":
                line = line[1:]
            size += len(line)
            while column + len(line) > FOLD_AT:
                cut = FOLD_AT - column
                parts += (line[:cut], FOLD)
                self.folded += 1
                line, column = line[cut:], len(FOLD) - 2
            parts.append(line)
            column += len(line)
        self._column = column
        return b"".join(parts), size

    def _keep(self, data: bytes, size: int) -> None:
        # The size is the message's, without the dots the client doubled (RFC 1870 §6.1's
        # "message size"): a message of dot-led lines under the limit is not refused for them.
        self._size += size
        if self._size_limit and self._size > self._size_limit:
            self._refuse(replies.MESSAGE_TOO_BIG)
        elif not self._budget.take(len(data)):
            self._refuse(replies.NO_ROOM)
        else:
            self._held += len(data)
            self._buffer += data

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


def _no_long_line(lines: bytes) -> bool:
    return max(map(len, lines.split(b"\r\n"))) <= FOLD_AT


async def _rest_of_line(reader: asyncio.StreamReader) -> bytes:
    """The rest of a line, so that a block ends where a line does (and is stored in C); of
    a line longer than the reader's limit, what surely comes before its end."""
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError as overrun:
        return await reader.read(overrun.consumed)
