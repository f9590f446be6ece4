"""The message after DATA, read in blocks: the same bytes, refusal and leftover input as a
reader taking one line at a time (the reference below, what the node did before), however
the client's bytes are cut into segments."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtpfleet import replies
from smtpfleet.inbound.budget import ByteBudget
from smtpfleet.inbound.message_data import MessageData

pytestmark = pytest.mark.timeout(60)

LIMIT = 40  # the stream reader's limit, as the session's line length limit (1001) scaled down


class LineAtATime(MessageData):
    """The reference: one line per read, as the node read before."""

    async def read(self, reader: asyncio.StreamReader) -> None:
        partial = False
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as overrun:
                await reader.read(overrun.consumed)
                self._refuse(replies.LINE_TOO_LONG)
                partial = True
                continue
            if not partial and line == b".\r\n":
                return
            partial = False
            self._store(line)


async def _outcome(
    kind: type[MessageData], stream: bytes, cuts: list[int], size_limit: int, budget: int
) -> tuple[bytes | None, str | None, bytes]:
    reader = asyncio.StreamReader(limit=LIMIT)
    data = kind(ByteBudget(budget), size_limit, LIMIT)
    reading = asyncio.ensure_future(data.read(reader))
    at = 0
    for cut in [*sorted(cuts), len(stream)]:
        reader.feed_data(stream[at:cut])
        at = max(at, cut)
        await asyncio.sleep(0)
    reader.feed_eof()
    try:
        await asyncio.wait_for(reading, 5)
    except asyncio.IncompleteReadError:
        return None, "gone", b""  # the client left before its final dot: nobody to answer
    left = await reader.read()
    return (data.take() if data.refusal is None else None), data.refusal, left


LINE = st.one_of(
    st.sampled_from([b".", b"..", b"...x", b"Thanks.", b"a.", b"", b"x" * 37, b"y" * 39]),
    st.binary(max_size=50).map(lambda b: b.replace(b"\r\n", b"")),
    st.text(".\r\nab", max_size=12).map(str.encode),
)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    lines = draw(st.lists(LINE, max_size=12))
    ended = draw(st.booleans()) or not lines
    stream = b"".join(line + b"\r\n" for line in lines)
    stream += (b".\r\n" if ended else b"") + draw(st.sampled_from([b"", b"QUIT\r\n"]))
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    return stream, cuts


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(sessions(), st.sampled_from([0, 60, 200]), st.sampled_from([30, 10_000]))
@example((b".\r\nQUIT\r\n", []), 0, 10_000)
@example((b"a\r\n.\r\n", [2]), 0, 10_000)
@example((b"a\r\n.\r\n", [3, 4]), 0, 10_000)
@example((b"..\r\n...\r\n.\r\n", [5]), 0, 10_000)
@example((b"x" * 60 + b"\r\n.\r\n", [41]), 0, 10_000)
@example((b"ab.\r\n" + b"x" * 45 + b"\r\nend.\r\n.\r\n", []), 0, 10_000)
def test_blocks_read_as_lines_do(
    session: tuple[bytes, list[int]], size_limit: int, budget: int
) -> None:
    stream, cuts = session

    async def both() -> None:
        theirs = await _outcome(LineAtATime, stream, cuts, size_limit, budget)
        ours = await _outcome(MessageData, stream, cuts, size_limit, budget)
        assert (ours[0], ours[2]) == (theirs[0], theirs[2])  # the message, the input left
        assert (ours[1] is None) == (theirs[1] is None)
        if ours[1] != theirs[1]:
            # Several reasons in one block: the permanent one is told, where line by line
            # the first line's was (a 452 for no room where the message was too big anyway).
            body = stream.split(b"\r\n.\r\n")[0] if not stream.startswith(b".\r\n") else b""
            assert ours[1] in {replies.LINE_TOO_LONG, replies.MESSAGE_TOO_BIG}
            if ours[1] == replies.MESSAGE_TOO_BIG:
                assert size_limit
                assert len(body) + 2 > size_limit
            else:
                assert max(len(line) for line in body.split(b"\r\n")) + 2 > LIMIT

    asyncio.run(both())


async def test_a_message_of_many_lines_takes_few_reads() -> None:
    reader = asyncio.StreamReader(limit=1001)
    reads = 0
    readuntil = reader.readuntil

    async def counted(separator: bytes = b"\n") -> bytes:
        nonlocal reads
        reads += 1
        return await readuntil(separator)

    reader.readuntil = counted  # type: ignore[method-assign]
    body = b"".join(b"line %d of the message\r\n" % n for n in range(30))
    reader.feed_data(body + b".\r\n")
    data = MessageData(ByteBudget(1 << 20), 0, 1001)
    await data.read(reader)
    assert data.take() == body
    assert reads <= 3  # a line at a time was 31
