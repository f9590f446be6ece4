"""One active health check: the relay must speak SMTP, not merely accept TCP.

Connect, a 2xx banner, EHLO, STARTTLS when the relay's policy asks for TLS, NOOP, QUIT, all
within one timeout. A 4xx/5xx banner, a refused connection, silence (a blackhole) or a slow
answer all count as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiosmtplib

from smtpfleet.config import RelayConfig, TlsPolicy


async def probe(relay: RelayConfig, *, timeout_s: float, helo: str) -> tuple[bool, str]:
    """(ok, reason) for one check of one relay."""
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        local_hostname=helo or None,
        timeout=timeout_s,
        start_tls=relay.tls is TlsPolicy.REQUIRED,
        validate_certs=relay.tls_verify,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await smtp.connect()
            response = await smtp.noop()
            if not 200 <= response.code < 300:
                return False, f"NOOP answered {response.code}"
            with contextlib.suppress(aiosmtplib.SMTPException):
                await smtp.quit()
    except TimeoutError:
        return False, "timeout"
    except aiosmtplib.SMTPResponseException as exc:
        return False, f"{exc.code} {' '.join(exc.message.split())[:100]}"
    except (aiosmtplib.SMTPException, OSError) as exc:
        return False, f"{exc.__class__.__name__}: {exc}"[:120]
    finally:
        smtp.close()
    return True, "ok"
