"""aiosmtpd 1.4.6's `SMTP.__init__`, with its introspection done once per class, not per session.

Each connection builds a session object, and aiosmtpd's constructor works out, every time,
what is the same for every session of a class and handler: `inspect.getmembers` over the
session and the handler looking for `auth_*` methods, `dir()` scans for `smtp_*` and
`handle_*`, and a signature check of the EHLO hook. That was a fifth of a node's CPU with a
new connection per message (how MX traffic arrives). Here the names are found once (`_Shape`)
and each session only binds them.

Everything else is set exactly as aiosmtpd sets it; tests/unit/test_session_init.py builds
sessions both ways and compares every attribute, so an aiosmtpd release that changes its
constructor fails there instead of misbehaving here (pyproject pins aiosmtpd below 1.5).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import (
    CALL_LIMIT_DEFAULT,
    SMTP,
    AuthCallbackType,
    AuthenticatorType,
    _AuthMechAttr,
    is_int,
    login_always_fail,
)

log = logging.getLogger("mail.log")  # aiosmtpd's logger, as its constructor uses


@dataclass(frozen=True)
class _Shape:
    """What aiosmtpd's constructor finds by introspection, by name."""

    auth: tuple[tuple[str, str, bool], ...]  # (mechanism, attribute, on the session itself)
    hooks: tuple[str, ...]  # handle_* attribute names of the handler
    ehlo_hook_ver: str | None
    commands: tuple[str, ...]  # smtp_* attribute names of the session class


_SHAPES: dict[tuple[type, type], _Shape] = {}  # by (session class, handler class)


def _shape(session_class: type[SMTP], handler_class: type) -> _Shape:
    key: tuple[type, type] = (session_class, handler_class)
    if key not in _SHAPES:
        _SHAPES[key] = _find_shape(session_class, handler_class)
    return _SHAPES[key]


def _find_shape(session_class: type[SMTP], handler_class: type) -> _Shape:
    auth = tuple(
        (_mechanism(name, member), name, own)
        for owner, own in ((session_class, True), (handler_class, False))
        for name, member in inspect.getmembers(owner)
        if name.startswith("auth_")
    )
    hooks = tuple(name for name in dir(handler_class) if name.startswith("handle_"))
    return _Shape(auth, hooks, _ehlo_hook_ver(handler_class), _commands(session_class))


def _mechanism(name: str, member: Any) -> str:
    default = name.replace("auth_", "").replace("__", "-")
    return str(getattr(member, "__auth_mechanism_name__", default))


def _commands(session_class: type[SMTP]) -> tuple[str, ...]:
    return tuple(name for name in dir(session_class) if name.startswith("smtp_"))


def _ehlo_hook_ver(handler_class: type) -> str | None:
    hook = getattr(handler_class, "handle_EHLO", None)
    if hook is None:
        return None
    # Unbound: the signature has `self` as well, so aiosmtpd's 4 and 5 are 5 and 6 here.
    params = len(inspect.signature(hook).parameters) - 1
    versions = {4: "old", 5: "new"}
    if params not in versions:
        raise RuntimeError("Unsupported EHLO Hook")
    return versions[params]


def init_session(
    session: SMTP,
    handler: Any,
    *,
    data_size_limit: int | None = 33554432,
    enable_SMTPUTF8: bool = False,  # noqa: N803 - aiosmtpd's name
    decode_data: bool = False,
    hostname: str | None = None,
    ident: str | None = None,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    timeout: float = 300,
    auth_required: bool = False,
    auth_require_tls: bool = True,
    auth_exclude_mechanism: Iterable[str] | None = None,
    auth_callback: AuthCallbackType | None = None,
    command_call_limit: int | dict[str, int] | None = None,
    authenticator: AuthenticatorType | None = None,
    proxy_protocol_timeout: float | None = None,
) -> None:
    """What `SMTP.__init__(handler, **those)` does, for a session on the running loop."""
    shape = _shape(type(session), type(handler))
    s: Any = session  # aiosmtpd's attributes are untyped
    s.__ident__ = ident or aiosmtpd_smtp.__ident__
    s.loop = asyncio.get_running_loop()
    asyncio.StreamReaderProtocol.__init__(
        session,
        asyncio.StreamReader(loop=s.loop, limit=session.line_length_limit),
        client_connected_cb=s._cb_client_connected,
        loop=s.loop,
    )
    s.event_handler = handler
    s.data_size_limit = data_size_limit
    s.enable_SMTPUTF8 = enable_SMTPUTF8
    s._decode_data = decode_data
    s.command_size_limits.clear()
    if not hostname:
        raise ValueError("a hostname is required (aiosmtpd would ask DNS for the FQDN)")
    s.hostname = hostname
    _set_tls(s, tls_context, require_starttls)
    s._timeout_duration = timeout
    s._timeout_handle = None
    s._tls_handshake_okay = True
    s._tls_protocol = None
    s._original_transport = None
    s.session = None
    s.envelope = None
    s.transport = None
    s._handler_coroutine = None
    _set_auth(s, shape, auth_required, auth_require_tls, auth_callback, authenticator)
    for mechanism in auth_exclude_mechanism or ():
        s._auth_methods.pop(mechanism, None)
    s._proxy_timeout = _proxy_timeout(proxy_protocol_timeout)
    s._handle_hooks = {name[7:]: getattr(handler, name) for name in shape.hooks}
    s._ehlo_hook_ver = shape.ehlo_hook_ver
    s._smtp_methods = {name[5:]: getattr(session, name) for name in shape.commands}
    _set_call_limit(s, command_call_limit)


def _set_tls(s: Any, context: ssl.SSLContext | None, require_starttls: bool) -> None:
    s.tls_context = context
    if context is not None and context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
        log.warning("tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}")
    s.require_starttls = context and require_starttls


def _set_auth(
    s: Any,
    shape: _Shape,
    required: bool,
    require_tls: bool,
    callback: AuthCallbackType | None,
    authenticator: AuthenticatorType | None,
) -> None:
    if not require_tls and required:
        warnings.warn("Requiring AUTH while not requiring TLS is unsafe", stacklevel=3)
    s._auth_require_tls = require_tls
    s._authenticator = authenticator
    s._auth_callback = None if authenticator is not None else (callback or login_always_fail)
    s._auth_required = required
    owners: dict[bool, Any] = {True: s, False: s.event_handler}
    s._auth_methods = {
        mechanism: _AuthMechAttr(getattr(owners[own], name), own)
        for mechanism, name, own in shape.auth
    }


def _proxy_timeout(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise ValueError("proxy_protocol_timeout must be > 0")
    return value


def _set_call_limit(s: Any, limit: int | dict[str, int] | None) -> None:
    s._enforce_call_limit = limit is not None
    if isinstance(limit, int):
        s._call_limit_base = {}
        s._call_limit_default = limit
    elif isinstance(limit, dict):
        if not all(map(is_int, limit.values())):
            raise TypeError("All command_call_limit values must be int")
        s._call_limit_base = limit
        s._call_limit_default = limit.get("*", CALL_LIMIT_DEFAULT)
    elif limit is not None:
        raise TypeError("command_call_limit must be int or Dict[str, int]")
