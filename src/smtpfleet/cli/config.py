"""`smtpfleet config check FILE`: validate a config file offline."""

from __future__ import annotations

import argparse
import functools
import ssl
from collections.abc import Callable

from smtpfleet.config import Config, load_config
from smtpfleet.config_tls import no_passphrase
from smtpfleet.errors import ConfigError
from smtpfleet.inbound.server import load_files
from smtpfleet.inbound.signing import load_keys

EXIT_OK = 0


def run(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    # The files a node reads: one that cannot be used is an error here, not at the start of
    # a node (the certificate, the users file, DKIM keys) or at its first connection (the CA
    # bundles and client certificates of relays and Redis).
    if not args.skip_files:
        load_keys(config.dkim)
        load_files(config.inbound)
        _tls_files(config)
    listen = ", ".join(
        f"{x.address} ({x.profile.value}{', implicit TLS' if x.implicit_tls else ''})"
        for x in config.inbound.all_listeners()
    )
    source = args.file or "(no file: defaults and SMTPFLEET_*)"
    print(
        f"{source}: ok: listen {listen}; {len(config.relays)} relays; "
        f"redis {config.redis.describe()}; {config.redis.shards} shards; "
        f"durability {config.queue.durability.value}"
        + (
            f"; DKIM for {', '.join(k.domain for k in config.dkim.keys)}"
            if config.dkim.keys
            else ""
        )
    )
    return EXIT_OK


def _tls_files(config: Config) -> None:
    for index, relay in enumerate(config.relays):
        if relay.tls_ca_file:
            _usable(
                f"relays.{index}.tls_ca_file", _context().load_verify_locations, relay.tls_ca_file
            )
    redis = config.redis
    if redis.tls_ca_file:
        _usable("redis.tls_ca_file", _context().load_verify_locations, redis.tls_ca_file)
    if redis.tls_cert_file:
        _usable(
            "redis.tls_cert_file",
            functools.partial(_context().load_cert_chain, password=no_passphrase),
            redis.tls_cert_file,
            redis.tls_key_file,
        )


def _context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _usable(key: str, load: Callable[..., None], *files: str) -> None:
    try:
        load(*files)
    except (OSError, ValueError) as exc:  # what is wrong, never the file's content
        raise ConfigError(f"{key}: cannot use {' with '.join(files)}: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")  # NO_CERTIFICATE_OR_CRL_FOUND
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
