"""SMTP AUTH credentials: a file of argon2 password hashes, and a limit on failed attempts.

The file holds one ``user:hash`` per line (``#`` comments and blank lines allowed); hashes are
argon2 as `argon2-cffi` writes them (``$argon2id$v=19$...``, `smtpfleet auth hash USER`). It
is read again when it changes (`Reloading`). Nothing here logs, counts or raises with a user
name or password in it: a broken line is named by its number.

Failed attempts are counted per client IP through `FailureCounter`. `LocalFailureCounter` is
this node's own, in memory; the cluster-wide one (Redis, `smtpfleet.queue.auth_failures`)
plugs in through the same small protocol and falls back to a local one when Redis is away.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from smtpfleet import replies
from smtpfleet.config import InboundAuthConfig
from smtpfleet.inbound.failures import FailureCounter
from smtpfleet.inbound.reload import Reloading

# argon2 costs tens of milliseconds of CPU and 64 MiB on purpose: run it off the event loop,
# and never more at once than this, so a flood of AUTH attempts cannot take the node.
VERIFY_SLOTS: Final = 2
MAX_TRACKED_CLIENTS: Final = 100_000  # the in-memory counter forgets the oldest beyond this


class AuthCheck(StrEnum):
    OK = "ok"
    INVALID = "bad_credentials"
    BLOCKED = "locked_out"  # too many failures from this client: 421 4.7.0


@dataclass(frozen=True)
class Credentials:
    """User name → argon2 hash."""

    hashes: dict[str, str]

    @classmethod
    def parse(cls, text: str, source: str) -> Credentials:
        hashes: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, encoded = line.partition(":")
            if not colon or not user or not encoded.startswith("$argon2"):
                raise ValueError(f"{source} line {number}: expected user:$argon2...")
            try:
                argon2.extract_parameters(encoded)
            except InvalidHashError:
                raise ValueError(f"{source} line {number}: not a valid argon2 hash") from None
            hashes[user] = encoded
        return cls(hashes)

    @classmethod
    def read(cls, path: str) -> Credentials:
        return cls.parse(Path(path).read_text(encoding="utf-8"), path)

    def verify(self, user: str, password: bytes) -> bool:
        """Blocking (argon2): call it in a thread.

        An unknown user is checked against another user's hash and refused, so it costs the
        same time as a known one: the reply time does not tell which names exist.
        """
        known = self.hashes.get(user)
        encoded = known or next(iter(self.hashes.values()), None)
        if encoded is None:
            return False
        try:
            matched = argon2.PasswordHasher().verify(encoded, password)
        except (VerificationError, InvalidHashError):  # VerifyMismatchError is one
            return False
        return matched and known is not None


def hash_password(password: str) -> str:
    """A line's hash part for the users file (`smtpfleet auth hash`)."""
    return argon2.PasswordHasher().hash(password)


class LocalFailureCounter:
    """This node's failed attempts per client IP within the last `window_s`, in memory."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._times: dict[str, list[float]] = {}

    def _recent(self, client: str) -> list[float]:
        horizon = self._clock() - self._window_s
        times = [t for t in self._times.get(client, ()) if t > horizon]
        if times:
            self._times[client] = times
        else:
            self._times.pop(client, None)
        return times

    async def failures(self, client: str) -> int:
        return len(self._recent(client))

    async def add_failure(self, client: str) -> int:
        times = self._recent(client)
        times.append(self._clock())
        self._times.pop(client, None)
        self._times[client] = times  # last in the dict: the most recently failed
        if len(self._times) > MAX_TRACKED_CLIENTS:
            del self._times[next(iter(self._times))]  # the least recently failed client
        return len(times)


class Authenticator:
    """Checks a user name and password for one client, under the failure limit."""

    def __init__(
        self,
        credentials: Callable[[], Credentials],
        failures: FailureCounter,
        max_failures: int,
    ) -> None:
        self._credentials = credentials
        self._failures = failures
        self._max_failures = max_failures
        self._slots = asyncio.Semaphore(VERIFY_SLOTS)

    @classmethod
    def from_config(
        cls, config: InboundAuthConfig, failures: FailureCounter | None = None
    ) -> Authenticator | None:
        """None without a users file; a file that cannot be read raises (OSError, ValueError)."""
        if not config.users_file:
            return None
        users = Reloading(
            (config.users_file,),
            lambda: Credentials.read(config.users_file),
            interval_s=config.reload_interval_s,
            what=f"AUTH users file {config.users_file}",
        )
        failures = failures or LocalFailureCounter(config.failure_window_s)
        return cls(users.get, failures, config.max_failures)

    async def blocked(self, client: str) -> bool:
        return await self._failures.failures(client) >= self._max_failures

    async def check(self, client: str, user: bytes, password: bytes) -> AuthCheck:
        """OK, INVALID, or BLOCKED when this failure reaches the limit."""
        credentials = self._credentials()
        try:
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            name = ""  # never a user: verified against a stand-in hash, and refused
        async with self._slots:
            ok = await asyncio.to_thread(credentials.verify, name, password)
        if ok:
            return AuthCheck.OK
        if await self._failures.add_failure(client) >= self._max_failures:
            return AuthCheck.BLOCKED
        return AuthCheck.INVALID


def initial_response(text: str) -> bytes | None:
    """The initial response of `AUTH mechanism response`, decoded; None when it is not base64.
    RFC 4954 §4: `=` is an empty one."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return None


def plain_credentials(response: bytes) -> tuple[bytes, bytes] | str:
    """RFC 4616's `authzid NUL authcid NUL passwd`: the user and password, or the reply that
    refuses them. aiosmtpd drops the authorization identity, so `alice` asking to act as
    `bob` got 235; here that is refused before the password is looked at."""
    parts = response.split(b"\0")
    if len(parts) != 3:
        return replies.AUTH_CANNOT_SPLIT
    authzid, user, password = parts
    if authzid not in (b"", user):
        return replies.AUTH_OTHER_IDENTITY
    return user, password
