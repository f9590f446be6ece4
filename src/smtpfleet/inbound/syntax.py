"""A fast path for the common MAIL/RCPT path argument. Pure.

aiosmtpd parses every path with the `email` package's RFC 5322 header parser: general, and
about a tenth of a node's CPU per message under load. Nearly every real path is the plain
``<dot-atom@domain>`` form, which one regular expression reads exactly as that parser does;
anything else (quoted local parts, comments, address literals, source routes, a missing
``>``) returns None and goes to aiosmtpd's parser unchanged.
"""

from __future__ import annotations

import re
from typing import Final

_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_PLAIN_PATH: Final = re.compile(
    rf"<((?:{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*)?)>(?:[ \t]+([^(]*))?"
)


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, the rest) for ``<local@domain> PARAMS`` and ``<>``; None for anything else.

    The address of ``<>`` is ``"<>"``, as aiosmtpd's own parser gives it.
    """
    match = _PLAIN_PATH.fullmatch(arg)
    if match is None:
        return None
    if not match.group(1):
        return "<>", arg[2:]  # aiosmtpd's parser keeps the blanks after a null path
    return match.group(1), match.group(2) or ""
