"""One SMTP client session over raw asyncio streams, for the load generators: reply codes read
without a client object per message, and every failure worded for the run's summary
(`SessionError`: "127.0.0.1:2525: MAIL refused: 550 5.7.1 sender refused").

A load generator pointed at the wrong thing (a closed port, a name that does not resolve, an
HTTP server, a server that refuses every command) must say so, not only count zeros.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

from smtpfleet.loadgen.messages import RECIPIENT, SENDER

# How long to wait for the server's 220: longer than a node waits for a PROXY header it
# expects (inbound.proxy_timeout_s, 5 s), so a node behind that option closes first, and the
# summary says so. A server that waits for us to speak first (an HTTP server) never greets:
# before this bound such a run waited out the 30 s command timeout per session.
GREETING_TIMEOUT_S = 10.0
SHOWN_CHARS = 120  # of a server's reply line, quoted in a cause
GREETING = "the greeting"


class SessionError(ConnectionError):
    """A session that failed, in words naming the endpoint and the step."""


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def seconds(value: float) -> str:
    """A wait as a cause words it: 2, 9.5 (not 9.499871)."""
    return f"{round(value, 1):g}"


def shown(line: bytes) -> str:
    """A server's line as a summary quotes it: one line, printable, short (a hostile or broken
    server chooses these bytes)."""
    text = line.decode("utf-8", errors="replace").strip()
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class Session:
    """A client session: commands and their reply codes, with the step and the last reply
    kept, so a failure can be told in words (`refused`, SessionError)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str = ""
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.where = where or "server"
        self.step = GREETING  # what the next reply answers
        self.last = ""  # the last reply line, as shown
        self.usable = True  # False: a reset failed, the next message needs a new session

    async def reply(self) -> int:
        while True:
            try:
                line = await self.reader.readline()
            except ValueError:  # past the stream's line limit (64 KiB)
                raise SessionError(f"{self.where}: a line over 64 KiB at {self.step}") from None
            if not line:
                raise SessionError(f"{self.where}: closed the connection at {self.step}")
            # RFC 5321 §4.2: three digits, then a space (last line), a hyphen, or the end.
            if not (line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n", b"")):
                raise SessionError(f"{self.where}: answered {shown(line)!r}: not SMTP")
            if line[3:4] != b"-":
                self.last = shown(line)
                return int(line[:3])

    async def command(self, text: bytes, step: str | None = None) -> int:
        """Write `text`, read the reply's code; `step` names it in errors (default: the verb)."""
        verb = text.split(b" ", 1)[0].split(b":", 1)[0].strip()
        self.step = step or (verb.decode() if verb.isalpha() and verb.isupper() else "a command")
        self.writer.write(text)
        return await self.reply()

    def refused(self) -> str:
        """The cause of a refusal just read: the endpoint, the step and the server's reply."""
        return f"{self.where}: {self.step} refused: {self.last}"

    async def send(self, data: bytes) -> tuple[int, float | None]:
        """MAIL, RCPT, DATA and the message: the final reply code, and the accept latency
        (the message with its final dot written to its reply read; None when not sent)."""
        for command in (f"MAIL FROM:<{SENDER}>\r\n", f"RCPT TO:<{RECIPIENT}>\r\n"):
            code = await self.command(command.encode())
            if code != 250:
                refusal = (self.step, self.last)
                try:
                    await self.command(b"RSET\r\n")
                except OSError:  # SessionError too
                    self.usable = False  # e.g. closed after a 421 (RFC 5321 §3.8)
                self.step, self.last = refusal  # the cause is the refusal, not the reset
                return code, None
        code = await self.command(b"DATA\r\n")
        if code != 354:
            return code, None
        started = time.perf_counter()
        code = await self.command(data, "the message")
        return code, time.perf_counter() - started


async def open_session(
    host: str,
    port: int,
    timeout_s: float,
    starttls: ssl.SSLContext | None = None,
    greeting_timeout_s: float = GREETING_TIMEOUT_S,
) -> Session:
    """Connect, read the 220, EHLO (and STARTTLS); SessionError saying what went wrong. The
    connection and the greeting each take at most `greeting_timeout_s`, the rest `timeout_s`."""
    where = endpoint(host, port)
    reader, writer = await _connect(host, port, where, min(timeout_s, greeting_timeout_s))
    session = Session(reader, writer, where)
    try:
        async with asyncio.timeout(greeting_timeout_s):
            greeting = await session.reply()
        if greeting != 220:
            raise SessionError(f"{where}: greeted with {session.last!r}")
        async with asyncio.timeout(timeout_s):
            await _ehlo(session)
            if starttls is not None:
                if await session.command(b"STARTTLS\r\n") != 220:
                    raise SessionError(session.refused())
                await writer.start_tls(starttls, server_hostname=host)
                await _ehlo(session)  # RFC 3207 §4.2: the session starts over under TLS
    except TimeoutError:
        writer.close()
        if session.step == GREETING:
            cause = f"{where}: no SMTP greeting within {seconds(greeting_timeout_s)} s"
        else:
            cause = f"{where}: no reply to {session.step} within {seconds(timeout_s)} s"
        raise SessionError(cause) from None
    except ssl.SSLError as exc:
        writer.close()
        raise SessionError(f"{where}: STARTTLS failed: {exc.reason or exc}") from None
    except SessionError:
        writer.close()
        raise
    except OSError as exc:  # e.g. reset by the server before or after its greeting
        writer.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise SessionError(f"{where}: {reason} at {session.step}") from None
    except BaseException:
        writer.close()
        raise
    return session


async def _connect(
    host: str, port: int, where: str, timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.open_connection(host, port)
    except TimeoutError:
        raise SessionError(f"{where}: no connection within {seconds(timeout_s)} s") from None
    except socket.gaierror as exc:
        raise SessionError(f"{host}: name not resolved ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise SessionError(f"{where}: connection refused") from None
    except OSError as exc:
        raise SessionError(f"{where}: cannot connect: {exc.strerror or exc}") from None


async def _ehlo(session: Session) -> None:
    if await session.command(b"EHLO loadgen.smtpfleet\r\n") != 250:
        raise SessionError(session.refused())
