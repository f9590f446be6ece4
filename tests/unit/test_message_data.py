"""The message after DATA, read in blocks: the same bytes, refusal and leftover input as a
plain reading of the whole stream (the reference below), however the client's bytes are cut
into segments; lines over 998 octets folded, as Sendmail and Postfix's SMTP client fold them."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtpfleet import replies
from smtpfleet.inbound.budget import ByteBudget
from smtpfleet.inbound.message_data import FOLD_AT, MessageData

pytestmark = pytest.mark.timeout(60)

LIMIT = 40  # the stream reader's limit, as the session's line length limit (1001) scaled down

Outcome = tuple[bytes | None, str | None, bytes]


def reference(stream: bytes, size_limit: int, budget: int) -> Outcome:
    """The whole stream at once: the lines up to the first lone dot, each unstuffed (RFC 5321
    §4.5.2) and folded after every FOLD_AT octets with CRLF and a space."""
    lines, at = [], 0
    while True:
        end = stream.find(b"\r\n", at)
        if end < 0:
            return None, "gone", b""  # the client left before its final dot
        line, at = stream[at:end], end + 2
        if line == b".":
            break
        lines.append(line[1:] if line[:1] == b"." else line)
    kept = []
    for line in lines:
        parts, rest = [line[:FOLD_AT]], line[FOLD_AT:]
        while rest:
            parts.append(b" " + rest[: FOLD_AT - 1])
            rest = rest[FOLD_AT - 1 :]
        kept.append(b"\r\n".join(parts) + b"\r\n")
    data = b"".join(kept)
    if size_limit and sum(len(line) + 2 for line in lines) > size_limit:
        return None, replies.MESSAGE_TOO_BIG, stream[at:]
    if len(data) > budget:
        return None, replies.NO_ROOM, stream[at:]
    return data, None, stream[at:]


async def _outcome(stream: bytes, cuts: list[int], size_limit: int, budget: int) -> Outcome:
    reader = asyncio.StreamReader(limit=LIMIT)
    data = MessageData(ByteBudget(budget), size_limit)
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
    # Around and far over the fold, some dot-led, some with a CR or a dot near a fold.
    st.tuples(
        st.sampled_from([b"", b".", b"..", b"\r"]),
        st.sampled_from([FOLD_AT - 2, FOLD_AT - 1, FOLD_AT, FOLD_AT + 1, 2 * FOLD_AT, 2500]),
        st.sampled_from([b"z", b".", b"\r", b"a.\r"]),
    ).map(lambda t: t[0] + t[2] * (t[1] // len(t[2]))),
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
@given(sessions(), st.sampled_from([0, 60, 200, 3000]), st.sampled_from([30, 2000, 10_000]))
@example((b".\r\nQUIT\r\n", []), 0, 10_000)
@example((b"a\r\n.\r\n", [2]), 0, 10_000)
@example((b"a\r\n.\r\n", [3, 4]), 0, 10_000)
@example((b"..\r\n...\r\n.\r\n", [5]), 0, 10_000)
@example((b"x" * 60 + b"\r\n.\r\n", [41]), 0, 10_000)
@example((b"ab.\r\n" + b"x" * 45 + b"\r\nend.\r\n.\r\n", []), 0, 10_000)
@example((b"x" * 2500 + b"\r\n.\r\n", [997, 998, 1999]), 0, 10_000)
@example((b"." * 1500 + b"\r\n.\r\n", []), 0, 10_000)
@example((b"y" * 1000 + b"\r\r\n.\r\n", [1001]), 0, 10_000)
@example((b"\r\n" + b"x" * 37 + b"\r\n\x00\r\n\x00\x00\r\n.\r\n", [49]), 0, 10_000)  # CR | LF.
@example((b"\r" * 1200 + b"\r\n.\r\n", [43]), 0, 10_000)
def test_blocks_read_as_the_whole_stream_reads(
    session: tuple[bytes, list[int]], size_limit: int, budget: int
) -> None:
    stream, cuts = session

    async def both() -> None:
        theirs = reference(stream, size_limit, budget)
        ours = await _outcome(stream, cuts, size_limit, budget)
        assert (ours[0], ours[2]) == (theirs[0], theirs[2])  # the message, the input left
        assert (ours[1] is None) == (theirs[1] is None)
        if ours[1] != theirs[1]:
            # Both limits passed: read in blocks, whichever a block passes first is told.
            assert {ours[1], theirs[1]} == {replies.MESSAGE_TOO_BIG, replies.NO_ROOM}

    asyncio.run(both())


def test_a_long_line_is_folded_into_lines_of_998_octets() -> None:
    async def read() -> tuple[bytes, int]:
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(b"Subject: s\r\n\r\n" + b"h" * 2500 + b"\r\nend\r\n.\r\n")
        data = MessageData(ByteBudget(1 << 20), 10_000)
        await data.read(reader)
        return data.take(), data.folded

    taken, folded = asyncio.run(read())
    body = taken.split(b"\r\n\r\n", 1)[1]
    assert body.split(b"\r\n") == [b"h" * 998, b" " + b"h" * 997, b" " + b"h" * 505, b"end", b""]
    assert folded == 2


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
    data = MessageData(ByteBudget(1 << 20), 0)
    await data.read(reader)
    assert data.take() == body
    assert reads <= 3  # a line at a time was 31
