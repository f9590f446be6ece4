"""One TLS session-ticket key for every process: a sender resumes its session on any of them.

OpenSSL gives every server context a random ticket key, so a ticket one process issued means
nothing to another: a sending MTA that comes back to another worker of the node (`serve
--workers`, one port shared by the kernel) or to another node behind the Service gets a full
handshake again, the costly part of a TLS connection. nginx (`ssl_session_ticket_key`) and
HAProxy (`tls-ticket-keys`) read the key from a file for that reason. Python's `ssl` has no
call for it, so this sets the key with OpenSSL's own `SSL_CTX_set_tlsext_ticket_keys` on the
context's `SSL_CTX`, from the library Python's `ssl` module loaded.

Whoever holds the key can decrypt the tickets, and with them the sessions resumed from them:
keep the file as secret as the certificate's key, and replace it now and then (tickets under
the old key then get a full handshake, nothing fails).
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
from pathlib import Path
from typing import Final

KEY_BYTES: Final = 80  # OpenSSL's layout: key name 16, HMAC secret 32, AES key 32
_SET_TICKET_KEYS: Final = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS (openssl/ssl.h)
# CPython's SSLContext object starts with PyObject_HEAD, then its SSL_CTX pointer.
_SSL_CTX_OFFSET: Final = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)


class TicketKeyError(ValueError):
    """The key could not be read or set; the message says why, without the key."""


def read_key(path: str) -> bytes:
    """The 80 bytes of a ticket key file (`openssl rand 80 > ticket.key`, as for nginx)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TicketKeyError(f"cannot read the TLS ticket key {path}: {e.strerror}") from None
    if len(data) != KEY_BYTES:
        raise TicketKeyError(
            f"the TLS ticket key {path} has {len(data)} bytes; it must have exactly "
            f"{KEY_BYTES} (make one with: openssl rand {KEY_BYTES} > {path})"
        )
    return data


def set_ticket_key(context: ssl.SSLContext, key: bytes) -> None:
    """Issue and accept this context's session tickets under `key`."""
    if len(key) != KEY_BYTES:
        raise TicketKeyError(f"a TLS ticket key has {KEY_BYTES} bytes, not {len(key)}")
    libssl = _libssl()
    pointer = _ssl_ctx(context, libssl)
    if libssl.SSL_CTX_ctrl(pointer, _SET_TICKET_KEYS, len(key), key) != 1:
        raise TicketKeyError("OpenSSL did not take the TLS ticket key")


def _ssl_ctx(context: ssl.SSLContext, libssl: ctypes.CDLL) -> int:
    if sys.implementation.name != "cpython":
        raise TicketKeyError("shared TLS ticket keys need CPython")
    pointer = ctypes.c_void_p.from_address(id(context) + _SSL_CTX_OFFSET).value
    # The options OpenSSL holds for that SSL_CTX are the ones Python reports for the context:
    # a check that the pointer is the context's before anything is written through it.
    if not pointer or libssl.SSL_CTX_get_options(pointer) != int(context.options):
        raise TicketKeyError("cannot find OpenSSL's context behind this Python SSLContext")
    return pointer


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl that Python's `ssl` module runs on (already loaded: this opens no other)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        raise TicketKeyError("shared TLS ticket keys need Linux's /proc/self/maps") from None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if "/libssl.so" in path:
            libssl = ctypes.CDLL(path)
            libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
            libssl.SSL_CTX_ctrl.argtypes += [ctypes.c_char_p]
            libssl.SSL_CTX_ctrl.restype = ctypes.c_long
            libssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            libssl.SSL_CTX_get_options.restype = ctypes.c_uint64
            return libssl
    raise TicketKeyError("cannot find the OpenSSL library of Python's ssl module")
