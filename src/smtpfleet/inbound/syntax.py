"""The MAIL/RCPT path argument and its parameters, read by RFC 5321's grammar and nothing
looser. Pure.

aiosmtpd reads paths with the `email` package's RFC 5322 header parser: it accepts comments,
blanks inside the local part (rewriting ``<a b@c>`` to ``"a b"@c``), a missing ``>``, and
control characters, and raises ``AttributeError`` on some broken address literals. What it
lets through can then be refused by our outbound client at every delivery attempt (a poison
message), so the node reads paths itself (RFC 5321 §4.1.2):

    Path           = "<" [ A-d-l ":" ] Mailbox ">"
    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string

with the limits of §4.5.3.1 (local part 64 octets, domain 255, path 256). Two deliberate
leniencies: dots in a Dot-string may repeat or lead (``a..b`` exists in the wild and cannot
route anywhere else), and a source route is accepted and dropped (§3.6.1 allows ignoring it;
what goes downstream is only the mailbox). Anything else, including every control or 8-bit
character (SMTPUTF8 is not offered), makes the path invalid. RCPT also takes §4.1.1.3's
``<Postmaster>``, the one path without a domain.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from smtpfleet.config_values import valid_literal as valid_literal

MAX_LOCAL_PART: Final = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN: Final = 255  # §4.5.3.1.2
MAX_PATH: Final = 256  # §4.5.3.1.3, with the angle brackets
NULL_PATH: Final = "<>"  # aiosmtpd's form of the null reverse-path (it needs a truthy value)
# RCPT's "<Postmaster>" (RFC 5321 §4.1.1.3), handed on as this bare local part: the one mailbox
# without a domain, which the handler completes with the node's domain (policy.py).
POSTMASTER: Final = "Postmaster"

_ATEXT: Final = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING: Final = rf"[{_ATEXT}.]*[{_ATEXT}][{_ATEXT}.]*"
_QUOTED_STRING: Final = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_SUB_DOMAIN: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN: Final = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL: Final = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ADL: Final = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"
_PATH: Final = re.compile(
    rf"<(?:{_ADL})?(?P<local>{_DOT_STRING}|{_QUOTED_STRING})@(?P<domain>{_DOMAIN}|{_LITERAL})>"
    # ESMTP parameters after one or more blanks: printable ASCII only, read by parse_params.
    r"(?:[ \t]+(?P<rest>[\x20-\x7e\t]*))?"
)
_NULL: Final = re.compile(r"<>(?:[ \t]+(?P<rest>[\x20-\x7e\t]*))?")
_VRFY_STRING: Final = re.compile(rf"[{_ATEXT}]+|{_QUOTED_STRING}")
# §4.1.1.3: "Postmaster" here is case-insensitive, unlike every other local part.
_POSTMASTER: Final = re.compile(r"<postmaster>(?:[ \t]+(?P<rest>[\x20-\x7e\t]*))?", re.IGNORECASE)
# §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value = 1*(%d33-60 /
# %d62-126), any printable character but "=".
_ESMTP_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE: Final = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
# A mailbox in its plain form, no angle brackets: a dot-atom local part (no leading, trailing
# or doubled dot) and a domain of letter-digit-hyphen labels. Address parsers hand it back
# unchanged, so a sender of commands may skip them for it (relays/pipelining.py).
PLAIN_MAILBOX: Final = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@{_DOMAIN}")


def parse_path(arg: str) -> tuple[str, str] | None:
    """(mailbox, ESMTP parameters) of ``<local@domain> PARAMS``; None if it is not a path.

    The null path gives ``"<>"`` as its mailbox, as aiosmtpd does; whether it may be used
    (MAIL yes, RCPT no) is the policy's decision.
    """
    null = _NULL.fullmatch(arg)
    if null is not None:
        return NULL_PATH, null["rest"] or ""
    match = _PATH.fullmatch(arg)
    if match is None or match.end("domain") + 1 > MAX_PATH:
        return None
    local, domain = match["local"], match["domain"]
    if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
        return None
    if domain.startswith("[") and not valid_literal(domain):
        return None
    return f"{local}@{domain}", match["rest"] or ""


def parse_vrfy(arg: str) -> str | None:
    """VRFY's String (RFC 5321 §3.5.3: an Atom or Quoted-string, a user name), or a path."""
    if _VRFY_STRING.fullmatch(arg):
        return arg
    path = parse_path(arg)
    return None if path is None or path[1] else path[0]


def parse_forward_path(arg: str) -> tuple[str, str] | None:
    """RCPT's argument: a path as `parse_path` reads it, or RFC 5321 §4.1.1.3's
    ``<Postmaster>`` in any case, given as (POSTMASTER, ESMTP parameters). §4.5.1: it MUST be
    accepted; it is no Mailbox, so MAIL never takes it."""
    postmaster = _POSTMASTER.fullmatch(arg)
    if postmaster is not None:
        return POSTMASTER, postmaster["rest"] or ""
    return parse_path(arg)


class RepeatedParameter(ValueError):
    """A MAIL or RCPT parameter given twice: two values, and no rule says which one counts."""

    def __init__(self, keyword: str) -> None:
        super().__init__(keyword)
        self.keyword = keyword  # upper case, and only ever a well-formed keyword


def parse_params(params: Sequence[str]) -> dict[str, str | bool] | None:
    """RFC 5321 §4.1.2 esmtp-params as aiosmtpd's ``_getparams`` gives them: keyword (upper
    case, §2.4) → value, or True for a keyword alone; None when one is malformed.

    Unlike aiosmtpd (``isalnum()``) a keyword may hold a hyphen (``X-FOO=1`` is well formed,
    and unknown: 555, not 501). A keyword given twice raises RepeatedParameter rather than the
    last value winning unseen (``SIZE=26214401 SIZE=10`` would pass the size check).
    """
    result: dict[str, str | bool] = {}
    for param in params:
        keyword, eq, value = param.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(keyword) or (eq and not _ESMTP_VALUE.fullmatch(value)):
            return None
        keyword = keyword.upper()
        if keyword in result:
            raise RepeatedParameter(keyword)
        result[keyword] = value if eq else True
    return result
