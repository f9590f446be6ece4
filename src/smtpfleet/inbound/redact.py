"""Keep SMTP AUTH secrets out of aiosmtpd's log records, at every level.

aiosmtpd (logger ``mail.log``) logs each command line it reads (INFO, DEBUG), unknown verbs
(WARNING) and base64 it cannot decode (DEBUG). It masks the argument of ``AUTH PLAIN <b64>``
itself, but a LOGIN or PLAIN response sent where a command was expected (after a refused AUTH,
or pipelined ahead of the challenge) is logged as it came, and that line is a base64 user name
or password. So the filter keeps a line only when it starts with an SMTP verb, and then never
the argument of AUTH; anything else in the record's arguments becomes ``<redacted>``.
"""

from __future__ import annotations

import logging
import re
from typing import Final

LOGGER: Final = "mail.log"  # aiosmtpd's
REDACTED: Final = "<redacted>"
OUTPUT: Final = "<<"  # aiosmtpd's records of what the server sent: "%r << %r"
# The commands a line may start with to be logged as it is (aiosmtpd's, with PROXY).
VERBS: Final = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP"}
    | {"STARTTLS", "PROXY"}
)
_AUTH = re.compile(rb"\s*AUTH(?:\s+(\S+))?", re.IGNORECASE)


def redact(value: object) -> object:
    """A log argument as it may be logged: command lines by verb, AUTH without its data."""
    if isinstance(value, str):
        encoded = value.encode("utf-8", "surrogateescape")
        redacted = redact(encoded)
        return value if redacted is encoded else redacted
    if not isinstance(value, bytes | bytearray):
        return value  # peers, numbers, exceptions: nothing a client typed after AUTH
    auth = _AUTH.match(value)
    if auth is not None:
        mechanism = (auth.group(1) or b"").decode("ascii", "replace")
        return f"AUTH {mechanism} ********".replace("  ", " ")
    verb = bytes(value).split(maxsplit=1)[:1]
    if verb and verb[0].upper().decode("ascii", "replace") in VERBS:
        return value
    return REDACTED


class RedactCredentials(logging.Filter):
    """A logger filter: rewrites every record's arguments through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if OUTPUT in str(record.msg):
            return True  # what we said ("%r << %r"): replies and AUTH challenges, no secret
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) for arg in record.args)
        elif record.args:
            record.args = {key: redact(arg) for key, arg in record.args.items()}
        return True


FILTER: Final = RedactCredentials()


def install() -> None:
    """On aiosmtpd's logger, once (addFilter ignores a filter it already has)."""
    logging.getLogger(LOGGER).addFilter(FILTER)
