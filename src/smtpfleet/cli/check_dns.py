"""`smtpfleet check-dns DOMAIN`: MX, SPF, DKIM and DMARC of a domain against the config."""

from __future__ import annotations

import argparse
import asyncio
import json

from smtpfleet.config import load_config, parse_hostport
from smtpfleet.dnscheck import DnsExpectations, check_domain, exit_code, render_table
from smtpfleet.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    expectations = DnsExpectations(
        egress_addresses=tuple(ip for relay in config.relays for ip in relay.egress_addresses),
        dkim=tuple((key.selector, key.public_key) for key in config.dns.dkim),
        active_active=config.dns.active_active,
        max_ttl_s=config.dns.max_ttl_s,
    )
    nameserver, port = None, 53
    if args.nameserver:
        try:
            nameserver, port = parse_hostport(args.nameserver, default_port=53)
        except ValueError as exc:
            raise ConfigError(f"--nameserver {exc}") from None
    checks = asyncio.run(check_domain(args.domain, expectations, nameserver=nameserver, port=port))
    if args.json:
        print(
            json.dumps(
                [{"check": c.name, "status": c.status.value, "detail": c.detail} for c in checks]
            )
        )
    else:
        print(render_table(checks))
    return exit_code(checks)
