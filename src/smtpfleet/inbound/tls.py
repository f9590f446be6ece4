"""Inbound TLS: the server context from PEM files, and what a session's TLS looks like.

TLS 1.2 is the oldest version offered (RFC 8996 retired 1.0 and 1.1; RFC 8314 §4.1). The
context is built again when the files change (`Reloading`), so a rotated Kubernetes secret
is used by the next session without a restart; sessions already in TLS keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, Final

from smtpfleet.config import InboundTlsConfig
from smtpfleet.config_tls import describe_pair_failure, no_passphrase
from smtpfleet.inbound.reload import Reloading
from smtpfleet.inbound.tls_tickets import read_key, set_ticket_key

MIN_VERSION: Final = ssl.TLSVersion.TLSv1_2
# TLS 1.2 suites: forward secret and AEAD only, Mozilla's "intermediate" list. OpenSSL's
# default also offers the CBC suites (ECDHE-*-AES*-SHA256/384), which testssl.sh flags as
# obsolete and LUCKY13-prone (docs/security.md); every TLS 1.2 client has GCM. TLS 1.3 suites
# are all AEAD and are not set here.
TLS12_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
HANDSHAKE_TIMEOUT_S: Final = 10  # seconds (asyncio's SSLProtocol is typed for an int)


class CertificateError(ValueError):
    """A certificate and key that cannot be used, in words: OpenSSL's own (`[SSL] PEM lib`)
    name neither the file nor what is wrong with it."""


def server_context(
    cert_file: str, key_file: str, ticket_key: bytes | None = None
) -> ssl.SSLContext:
    """A server context that asks for no client certificate; with `ticket_key`, its session
    tickets are those of every process with the same key (inbound/tls_tickets.py)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MIN_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    # TLS 1.3: one session ticket per full handshake, as Postfix's smtpd sends, not OpenSSL's
    # two. A sending MTA caches one session per destination; each extra ticket is another
    # encryption and another record on every new connection, on both sides, for nothing.
    context.num_tickets = 1
    if ticket_key is not None:
        set_ticket_key(context, ticket_key)
    return context


def certificates(config: InboundTlsConfig) -> Reloading[ssl.SSLContext] | None:
    """The listeners' context, reloaded on change; None when no certificate is configured."""
    if not config.cert_file:
        return None
    ticket_key = (config.ticket_key_file,) if config.ticket_key_file else ()

    def load() -> ssl.SSLContext:
        key = read_key(config.ticket_key_file) if config.ticket_key_file else None
        try:
            return server_context(config.cert_file, config.key_file, key)
        except (OSError, ValueError) as exc:  # ssl.SSLError too
            why = describe_pair_failure(config.cert_file, config.key_file, exc)
            raise CertificateError(why) from None

    return Reloading(
        (config.cert_file, config.key_file, *ticket_key),
        load,
        interval_s=config.reload_interval_s,
        what=f"TLS certificate {config.cert_file}",
    )


def describe(extra: Mapping[str, Any] | None) -> str | None:
    """The TLS of a session for its Received header, as Postfix writes it; None: no TLS.

    `extra` is the TLS transport's extra info (aiosmtpd keeps it as `session.ssl`).
    """
    if not extra or not extra.get("cipher"):
        return None
    name, protocol, bits = extra["cipher"]
    ssl_object = extra.get("ssl_object")
    version = ssl_object.version() if ssl_object is not None else None
    return f"using {version or protocol} with cipher {name} ({bits}/{bits} bits)"
