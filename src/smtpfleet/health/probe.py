"""One active health check: the relay must speak SMTP, not merely accept TCP.

Connect, a 2xx banner, EHLO, STARTTLS as the relay's policy says (always under `required`,
when offered under `opportunistic`: the same as a delivery session), NOOP, QUIT, all within
one timeout. A 4xx/5xx banner, a refused connection, silence (a blackhole), a slow answer, or
a TLS handshake that fails (a certificate that does not verify against the relay's CA bundle)
all count as a failure, with a reason an operator can act on.

Under TLS the check also reads the relay's certificate: days until it expires. Python's ssl
module only shows the certificate it verified, so with `tls_verify: false` there is no expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from smtpfleet.config import RelayConfig, TlsPolicy

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    tls_version: str | None = None  # the handshake's TLS version; None: no TLS
    tls_failed: bool = False  # a TLS handshake was tried and failed
    cert_days_left: float | None = None  # None: no verified certificate seen


async def probe(relay: RelayConfig, *, timeout_s: float, helo: str) -> ProbeResult:
    """One check of one relay."""
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        local_hostname=helo or None,
        timeout=timeout_s,
        start_tls=_start_tls(relay.tls),
        validate_certs=relay.tls_verify,
        cert_bundle=relay.tls_ca_file or None,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await smtp.connect()
            version, days_left = _tls_facts(smtp)
            response = await smtp.noop()
            if not 200 <= response.code < 300:
                return ProbeResult(False, f"NOOP answered {response.code}", version)
            with contextlib.suppress(aiosmtplib.SMTPException):
                await smtp.quit()
    except TimeoutError:
        return ProbeResult(False, "timeout")
    except aiosmtplib.SMTPResponseException as exc:
        return ProbeResult(False, f"{exc.code} {' '.join(exc.message.split())[:100]}")
    except (aiosmtplib.SMTPException, OSError) as exc:
        return _failure(relay, exc)
    finally:
        smtp.close()
    return ProbeResult(True, "ok", version, cert_days_left=days_left)


def _start_tls(policy: TlsPolicy) -> bool | None:
    # As for delivery sessions (relays/pool.py): None upgrades when STARTTLS is offered.
    return {TlsPolicy.NONE: False, TlsPolicy.OPPORTUNISTIC: None, TlsPolicy.REQUIRED: True}[policy]


def _failure(relay: RelayConfig, exc: Exception) -> ProbeResult:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
        return ProbeResult(False, reason[:120], tls_failed=True)
    if isinstance(exc, ssl.SSLError):
        return ProbeResult(
            False, f"TLS handshake failed: {exc.reason or exc}"[:120], tls_failed=True
        )
    tls_failed = relay.tls is not TlsPolicy.NONE and "tls" in str(exc).lower()
    return ProbeResult(False, f"{exc.__class__.__name__}: {exc}"[:120], tls_failed=tls_failed)


def _tls_facts(smtp: aiosmtplib.SMTP) -> tuple[str | None, float | None]:
    """The session's TLS version and the days its verified peer certificate has left."""
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None, None
    not_after = (ssl_object.getpeercert() or {}).get("notAfter")
    if not isinstance(not_after, str):
        return ssl_object.version(), None
    return ssl_object.version(), days_left(not_after, time.time())


def days_left(not_after: str, now_s: float) -> float:
    """Days from `now_s` until a certificate's notAfter ("Jun  1 12:00:00 2030 GMT")."""
    return (ssl.cert_time_to_seconds(not_after) - now_s) / SECONDS_PER_DAY
