"""A seeded, stateful SMTP fuzzer: hostile sessions against a real node, invariants checked.

Each session is generated from the seed alone, so a failure replays exactly with the same seed
and session number. The generator mutates commands (control and 8-bit bytes, broken paths,
unknown verbs), pipelines groups of commands (RFC 2920), sends odd message data (bare CR or LF,
dot-stuffing, long lines), writes slowly, and hangs up at random points, some before the banner
(a closed or reset connection, as a load balancer's TCP check or a scanner). The driver speaks to
the node like a client would, one reply per command line, and records:

- every reply line is well formed (three digits, then space or hyphen; 4xx/5xx carry an RFC
  3463 enhanced code) and arrives within the time limit (no hang);
- no reply says our own fault (`Local error`): the node's bugs must not hide behind 4xx;
- which messages got `250` at the final dot (acknowledged) and which were refused.

The caller then checks delivery: everything acknowledged arrives, nothing refused does (each
message carries a unique `X-Fuzz-Token` header), the node's log has no ERROR, and the node
keeps no connection open once every session ended (`open_connections`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from smtpfleet.inbound.tls import HANDSHAKE_TIMEOUT_S

TOKEN_HEADER: Final = b"X-Fuzz-Token"
# Longer than the longest wait the node may rightly make before it answers or closes. After
# `220` to STARTTLS it reads a TLS record, and a session whose next line is shorter than a
# record's header (an empty line: two bytes) is closed only when the handshake times out. At
# the same 10 s, which timer fired first was a race: a fuzz run reported it as a hang.
REPLY_TIMEOUT_S: Final = HANDSHAKE_TIMEOUT_S + 5.0
_REPLY_LINE: Final = re.compile(rb"[2-5][0-9][0-9](?:[ -].*)?")
_ENHANCED: Final = re.compile(rb"[245][0-9][0-9][ -][245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")
_OUR_FAULT: Final = re.compile(rb"Local error")
_TOKEN: Final = re.compile(rb"^X-Fuzz-Token: (\S+)\r?$", re.MULTILINE)

GOOD_SENDERS: Final = ("<s@example.com>", "<>", "<first.last+tag@sender.example>")
GOOD_RECIPIENTS: Final = ("<r@example.net>", "<a.b@example.net>", "<postmaster@example.net>")
HOSTILE_PATHS: Final = (
    "<\x0bpoison@fuzz.example>",
    "<\x1fa..b@example.net>",
    "<a@[>",
    "<a@[1.2.3.4>",
    "x@[127.0.0.1",
    "<a b@example.net>",
    "<(c)a@example.net>",
    "<a@example.net(c)>",
    "<a@example.net",
    "<a@b_c.example.net>",
    "<v@elsewhere.org>",
    "<v%elsewhere.org@example.net>",
    "<elsewhere.org!v@example.net>",
    '<"v@elsewhere.org"@example.net>',
    "<@elsewhere.org:v@example.net>",
    "<v@[192.0.2.1]>",
    "<" + "l" * 300 + "@example.net>",
    "<r@example.net> SIZE=abc",
    "<r@example.net> FOO=BAR",
    "<>",
)
VERBS: Final = ("NOOP", "RSET", "HELP", "HELP MAIL", "VRFY postmaster", "VRFY <a@[>", "EXPN x")
_HOSTILE_BYTES: Final = (0x00, 0x0B, 0x0C, 0x1C, 0x1F, 0x7F, 0xE9, 0xFF, 0x0D, 0x20, 0x3C, 0x3E)
BOGUS: Final = ("BOGUS", "MAIL", "RCPT", "DATA x", "STARTTLS", "AUTH PLAIN", "XCLIENT A=1", "")


@dataclass
class Session:
    """One generated session: groups of command lines, each group written at once."""

    number: int
    groups: list[list[bytes]] = field(default_factory=list)
    bodies: dict[int, bytes] = field(default_factory=dict)  # group index → data after 354
    tokens: dict[int, str] = field(default_factory=dict)  # group index → its message's token
    hang_up_after: int | None = None  # abort the connection after writing this group
    hang_up_after_dot: bool = False  # abort right after a final dot, before its reply
    slow: bool = False  # write byte by byte chunks with pauses
    # Leave before the banner, as a load balancer's TCP check or a scanner does: "fin" closes,
    # "rst" resets. Drawn apart from the rest, so a seed's other sessions keep their shape.
    leave_before_banner: str | None = None


@dataclass
class Findings:
    sessions: int = 0
    replies: int = 0
    acknowledged: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)  # the client hung up before the reply
    violations: list[str] = field(default_factory=list)

    def add(self, other: Findings) -> None:
        self.sessions += other.sessions
        self.replies += other.replies
        self.acknowledged |= other.acknowledged
        self.refused |= other.refused
        self.unknown |= other.unknown
        self.violations += other.violations


class Generator:
    """Sessions from a seed: session n is the same for the same seed, whatever ran before."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def session(self, number: int) -> Session:
        rng = random.Random(f"{self.seed}:{number}")
        session = Session(number, slow=rng.random() < 0.05)
        session.groups.append([self._greeting(rng)])
        for _ in range(rng.randint(1, 3)):
            self._transaction(rng, session)
        for _ in range(rng.randint(0, 3)):
            session.groups.append([self._mutate(rng, rng.choice(VERBS + BOGUS))])
        session.groups.append([b"QUIT"])
        if rng.random() < 0.1:
            session.hang_up_after = rng.randrange(len(session.groups))
        session.hang_up_after_dot = rng.random() < 0.05
        early = random.Random(f"{self.seed}:{number}:banner").random()
        session.leave_before_banner = "fin" if early < 0.05 else "rst" if early < 0.1 else None
        return session

    def _greeting(self, rng: random.Random) -> bytes:
        names = ["client.example"] * 6 + ["[127.0.0.1]", "x" * 80, "a\x00b", "c\x7f"]
        name = rng.choice(names)
        return self._mutate(rng, f"{rng.choice(['EHLO', 'HELO', 'ehlo'])} {name}", 0.1)

    def _transaction(self, rng: random.Random, session: Session) -> None:
        sender = rng.choice(GOOD_SENDERS) if rng.random() < 0.8 else rng.choice(HOSTILE_PATHS)
        lines = [self._mutate(rng, f"MAIL FROM:{sender}", 0.05)]
        for _ in range(rng.randint(1, 3)):
            good = rng.random() < 0.75
            recipient = rng.choice(GOOD_RECIPIENTS if good else HOSTILE_PATHS)
            lines.append(self._mutate(rng, f"RCPT TO:{recipient}", 0.05))
        if rng.random() < 0.9:
            lines.append(b"DATA")
            index = len(session.groups)
            token = f"{self.seed}-{session.number}-{index}"
            session.bodies[index] = self._body(rng, token)
            session.tokens[index] = token
        if rng.random() < 0.5:  # pipelined (RFC 2920): DATA may only be the last of a group
            session.groups.append(lines)
        else:
            session.groups.extend([line] for line in lines[:-1])
            session.groups.append([lines[-1]])
            if lines[-1] == b"DATA":  # the body belongs to DATA's group, now the last one
                last = len(session.groups) - 1
                session.bodies[last] = session.bodies.pop(index)
                session.tokens[last] = session.tokens.pop(index)

    def _body(self, rng: random.Random, token: str) -> bytes:
        lines = [
            f"{TOKEN_HEADER.decode()}: {token}".encode(),
            f"Message-ID: <{token}@fuzz.example>".encode(),
            b"Subject: fuzz",
            b"",
        ]
        for _ in range(rng.randint(0, 12)):
            lines.append(self._body_line(rng))
        data = b"\r\n".join(lines) + b"\r\n"
        return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"

    def _body_line(self, rng: random.Random) -> bytes:
        kind = rng.random()
        if kind < 0.05:
            return b"smuggled\n.\nMAIL FROM:<evil@example.org>"  # bare LF around a dot
        if kind < 0.08:
            return b"bare\rcr"
        if kind < 0.12:
            return b"y" * rng.choice([998, 999, 1200])
        if kind < 0.2:
            return bytes(rng.randrange(0x80, 0x100) for _ in range(20))
        if kind < 0.3:
            return b"." + b"dotted"
        return b"line %d" % rng.randrange(10**6)

    def _mutate(self, rng: random.Random, line: str, chance: float = 0.5) -> bytes:
        """The line, or (with `chance`) the line with one to three bytes replaced."""
        data = bytearray(line.encode("latin-1"))
        if data and rng.random() < chance:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.choice(_HOSTILE_BYTES)
        # A line feed inside would split the line in two, and the driver counts one reply per
        # line; bare LF is exercised in message data, where it matters (smuggling).
        return bytes(data).replace(b"\n", b" ")


class Driver:
    """Runs generated sessions against one SMTP address and checks every reply on the wire."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address

    async def run(self, sessions: Sequence[Session], concurrency: int) -> Findings:
        findings = Findings()
        queue: asyncio.Queue[Session] = asyncio.Queue()
        for session in sessions:
            queue.put_nowait(session)

        async def worker() -> None:
            while not queue.empty():
                findings.add(await self.one(queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return findings

    async def one(self, session: Session) -> Findings:
        findings = Findings(sessions=1)
        reader, writer = await asyncio.open_connection(*self.address)
        if session.leave_before_banner is not None:
            await _leave(writer, reset=session.leave_before_banner == "rst")
            findings.refused |= set(session.tokens.values())  # never sent: never to arrive
            return findings
        try:
            await self._converse(session, reader, writer, findings)
        except TimeoutError:
            findings.violations.append(f"session {session.number}: no reply in time (hang)")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the node may close after 421; a reset after our own abort is expected
        finally:
            writer.transport.abort()
        tokens = set(session.tokens.values())
        findings.refused |= tokens - findings.acknowledged - findings.unknown
        return findings

    async def _converse(
        self,
        session: Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        findings: Findings,
    ) -> None:
        if not await self._expect(session, reader, findings, b"220"):
            return
        for index, group in enumerate(session.groups):
            await self._write(writer, b"".join(line + b"\r\n" for line in group), session.slow)
            if session.hang_up_after == index:
                return
            last = b""
            for _ in group:
                last = await self._reply(session, reader, findings)
                if last.startswith(b"421") or not last:
                    return
            if index in session.bodies and last.startswith(b"354"):
                await self._write(writer, session.bodies[index], session.slow)
                if session.hang_up_after_dot:
                    findings.unknown.add(session.tokens[index])
                    return
                final = await self._reply(session, reader, findings)
                token = session.tokens[index]
                (findings.acknowledged if final.startswith(b"250") else findings.refused).add(token)
                if final.startswith(b"421") or not final:
                    return

    async def _expect(
        self, session: Session, reader: asyncio.StreamReader, findings: Findings, code: bytes
    ) -> bool:
        return (await self._reply(session, reader, findings)).startswith(code)

    async def _reply(
        self, session: Session, reader: asyncio.StreamReader, findings: Findings
    ) -> bytes:
        """One whole reply (its last line); b"" when the node closed the connection."""
        while True:
            line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_S)
            if not line:
                return b""
            findings.replies += 1
            text = line.rstrip(b"\r\n")
            if not _REPLY_LINE.fullmatch(text) or not line.endswith(b"\r\n"):
                findings.violations.append(f"session {session.number}: malformed {line!r}")
            elif text[:1] in b"45" and not _ENHANCED.match(text):
                findings.violations.append(f"session {session.number}: no enhanced code {text!r}")
            if _OUR_FAULT.search(text):
                findings.violations.append(f"session {session.number}: our fault {text!r}")
            if text[3:4] != b"-":
                return text

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes, slow: bool) -> None:
        step = 7 if slow else max(len(data), 1)
        for start in range(0, len(data), step):
            if writer.transport.is_closing():
                # The node closed the connection while a slow writer was still at it (221
                # after QUIT, 421): what it said last is read next, unless its reset came
                # first. uvloop raises on a write to a closed transport: a fuzz run died of it.
                return
            writer.write(data[start : start + step])
            try:
                await writer.drain()
            except ConnectionError:
                return  # as above
            if slow:
                await asyncio.sleep(0.001)


async def _leave(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:  # linger 0: close() resets the connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


_KEPT_OPEN: Final = {"01", "08"}  # /proc/net/tcp states: ESTABLISHED, CLOSE_WAIT


def open_connections(port: int) -> int:
    """Connections to `port` that its server has not closed (established, or half closed by the
    client and kept so: the leak of a session that ended without closing its connection)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for row in table.read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in _KEPT_OPEN:
                count += 1
    return count


def tokens_in(data: bytes) -> list[str]:
    """The fuzz tokens in a delivered message (a DSN quotes its original's headers)."""
    return [m.decode("ascii", "replace") for m in _TOKEN.findall(data)]
