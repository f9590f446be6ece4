"""DKIM signing of accepted mail: keys from files (reloaded on change), signatures counted.

Signed once, at accept time, before the message is queued: the queued body carries the
signature, so every delivery of it (a retry, another relay, a survivor's takeover) sends the
same bytes. Signing at delivery would sign again on every attempt, on every node, and would
need the keys on every node's delivery path at the moment of sending.

A message that cannot be signed is, by default, queued unsigned with a warning and counted
(`dkim.on_failure: accept`): the key is already loaded and checked, so what is left to fail
is the message itself, and a 451 would only make the client send the same bytes again until
it gives up. `tempfail` answers 451 instead, for domains whose DMARC policy rejects unsigned
mail (docs/security.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

from smtpfleet.config import DkimConfig, DkimSigningKey, SigningFailure
from smtpfleet.errors import ConfigError, SigningFailed
from smtpfleet.inbound.dkim import SigningKey, author_domain, parse_private_key, signature
from smtpfleet.inbound.reload import Reloading
from smtpfleet.metrics import Metrics

log = logging.getLogger(__name__)

NO_DOMAIN = "none"  # the metric's domain label when the From: domain has no key


def read_key(config: DkimSigningKey) -> SigningKey:
    """The key of one domain, read and checked; OSError or KeyProblem (a ValueError)."""
    pem = parse_private_key(Path(config.key_file).read_bytes())
    return SigningKey(
        domain=config.domain,
        selector=config.selector,
        pem=pem,
        headers=tuple(config.headers),
        canonicalization=config.canonicalization.value,
    )


def load_keys(config: DkimConfig) -> dict[str, Reloading[SigningKey]]:
    """Every configured key, by domain; a key that cannot be used is a ConfigError naming
    the key (all of them reported at once), never its content."""
    keys: dict[str, Reloading[SigningKey]] = {}
    problems = []
    for index, key in enumerate(config.keys):
        try:
            keys[key.domain] = Reloading(
                (key.key_file,),
                functools.partial(read_key, key),
                interval_s=config.reload_interval_s,
                what=f"DKIM key {key.key_file}",
            )
        except OSError as exc:
            problems.append(
                f"dkim.keys.{index}.key_file: cannot read {exc.filename}: {exc.strerror}"
            )
        except ValueError as exc:
            problems.append(f"dkim.keys.{index}.key_file: {key.key_file}: {exc}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return keys


class DkimSigner:
    """Puts a DKIM-Signature on accepted mail of the configured From: domains."""

    def __init__(self, config: DkimConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._keys: dict[str, Reloading[SigningKey]] = {}
        for key in config.keys:
            for result in ("signed", "failed"):
                metrics.dkim.labels(key.domain, result)
        metrics.dkim.labels(NO_DOMAIN, "no_key")

    def load(self) -> None:
        """Read every key file (at start): raises ConfigError."""
        self._keys = load_keys(self._config)

    async def sign(self, message: bytes) -> bytes:
        """`message` with a DKIM-Signature on top, or as it was (no key for its From: domain,
        or it cannot be signed and on_failure is accept); raises SigningFailed."""
        domain = author_domain(message)
        reloading = self._keys.get(domain) if domain else None
        if reloading is None:
            self._metrics.dkim.labels(NO_DOMAIN, "no_key").inc()
            return message
        key = reloading.get()
        try:
            # In a thread: dkimpy's RSA is pure Python (about 12 ms a signature at 2048 bits)
            # and a 25 MB body takes 1.5 s to canonicalize. The GIL still serializes it, but
            # the loop runs between its steps instead of stalling every session for all of it.
            header = await asyncio.to_thread(signature, message, key)
        except Exception as exc:  # dkimpy's DKIMException, or a bug of ours: never lose mail
            return self._failed(message, key.domain, exc)
        self._metrics.dkim.labels(key.domain, "signed").inc()
        return header + message

    def _failed(self, message: bytes, domain: str, exc: Exception) -> bytes:
        self._metrics.dkim.labels(domain, "failed").inc()
        if self._config.on_failure is SigningFailure.TEMPFAIL:
            log.warning("DKIM signing for %s failed, answered 451: %r", domain, exc)
            raise SigningFailed(str(exc)) from exc
        log.warning("DKIM signing for %s failed, queued unsigned: %r", domain, exc)
        return message
