"""`smtpfleet check-dns DOMAIN`: MX, SPF, DKIM and DMARC of a domain against the config."""

from __future__ import annotations

import argparse
import asyncio
import json

from smtpfleet.config import Config, domain_name, load_config, parse_hostport
from smtpfleet.dnscheck import DnsExpectations, check_domain, exit_code, is_ip, render_table
from smtpfleet.errors import ConfigError
from smtpfleet.inbound.dkim import public_key
from smtpfleet.inbound.signing import load_keys


def dkim_expectations(config: Config, domain: str) -> tuple[tuple[str, str], ...]:
    """(selector, base64 public key) to find published: the key this domain's mail is signed
    with (derived from the private key in use), then the `dns.dkim` entries."""
    keys = load_keys(config.dkim)  # ConfigError when a key file cannot be used
    wanted = domain.rstrip(".").lower()
    in_use = [reloading.get() for name, reloading in keys.items() if name == wanted]
    signing = {key.selector: public_key(key.pem) for key in in_use}
    listed = {key.selector: key.public_key for key in config.dns.dkim}
    return tuple({**listed, **signing}.items())


def run(args: argparse.Namespace) -> int:
    try:
        domain = domain_name(args.domain)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config = load_config(args.config)
    expectations = DnsExpectations(
        egress_addresses=tuple(ip for relay in config.relays for ip in relay.egress_addresses),
        dkim=dkim_expectations(config, domain),
        active_active=config.dns.active_active,
        max_ttl_s=config.dns.max_ttl_s,
    )
    nameserver, port = None, 53
    if args.nameserver:
        try:
            nameserver, port = parse_hostport(args.nameserver, default_port=53)
        except ValueError as exc:
            raise ConfigError(f"--nameserver {exc}") from None
        if not is_ip(nameserver):
            raise ConfigError(f"--nameserver {args.nameserver!r}: expected IP[:PORT]")
    checks = asyncio.run(check_domain(domain, expectations, nameserver=nameserver, port=port))
    if args.json:
        print(
            json.dumps(
                [{"check": c.name, "status": c.status.value, "detail": c.detail} for c in checks]
            )
        )
    else:
        print(render_table(checks))
    return exit_code(checks)
