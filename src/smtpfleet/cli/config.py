"""`smtpfleet config check FILE`: validate a config file offline."""

from __future__ import annotations

import argparse

from smtpfleet.config import load_config
from smtpfleet.inbound.signing import load_keys

EXIT_OK = 0


def run(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    load_keys(config.dkim)  # a key file that cannot be used is a config error here too
    listen = ", ".join(
        f"{x.address} ({x.profile.value}{', implicit TLS' if x.implicit_tls else ''})"
        for x in config.inbound.all_listeners()
    )
    print(
        f"{args.file}: ok: listen {listen}; {len(config.relays)} relays; "
        f"redis {config.redis.describe()}; {config.redis.shards} shards; "
        f"durability {config.queue.durability.value}"
        + (
            f"; DKIM for {', '.join(k.domain for k in config.dkim.keys)}"
            if config.dkim.keys
            else ""
        )
    )
    return EXIT_OK
