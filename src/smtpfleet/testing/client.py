"""A real SMTP client and a real `smtpfleet` process, as tests and drills use them."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import aiosmtplib


def make_message(
    *,
    sender: str = "sender@example.com",
    recipients: Sequence[str] = ("rcpt@example.net",),
    subject: str = "test",
    body: str = "hello\r\n",
    message_id: str | None = None,
) -> bytes:
    """A small RFC 5322 message with CRLF line endings and a unique Message-ID."""
    mid = message_id or f"<{uuid.uuid4().hex}@test.smtpfleet>"
    headers = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: {subject}",
        f"Message-ID: {mid}",
        f"Date: {email.utils.formatdate()}",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


@dataclass(frozen=True)
class Reply:
    code: int
    text: str


async def send(
    address: tuple[str, int],
    *,
    sender: str = "sender@example.com",
    recipients: Sequence[str] = ("rcpt@example.net",),
    data: bytes | None = None,
    timeout_s: float = 15.0,
) -> Reply:
    """Send one message over a fresh session; the final reply as seen on the wire.

    Connection failures become code 0 so load loops can count them without try/except.
    """
    payload = data if data is not None else make_message(sender=sender, recipients=recipients)
    client = aiosmtplib.SMTP(
        hostname=address[0], port=address[1], timeout=timeout_s, start_tls=False
    )
    try:
        async with client:
            # sendmail, not aiosmtplib.send: the latter refuses the null reverse-path.
            _, text = await client.sendmail(sender, list(recipients), payload)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0]
        return Reply(first.code, first.message)
    except aiosmtplib.SMTPResponseException as exc:
        return Reply(exc.code, exc.message)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        return Reply(0, f"{exc.__class__.__name__}: {exc}")
    return Reply(250, text)


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> tuple[int, str, str]:
    """`python -m smtpfleet ARGS` as its own process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpfleet",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    """`python -m smtpfleet ARGS` in a process group of its own, SIGINT as a terminal gives
    it (a test runner may run with SIGINT ignored, which a child would inherit)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpfleet",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


async def finish_cli(process: asyncio.subprocess.Process, timeout_s: float) -> tuple[int, str, str]:
    """Its exit code and output; killed (with anything it started) if it outlasts timeout_s."""
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.communicate()
        raise AssertionError(f"still running after {timeout_s} s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
) -> None:
    """Wait until predicate() (plain or async) is true; TimeoutError if not within timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
