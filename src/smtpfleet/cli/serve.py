"""`smtpfleet serve [--workers N]`: one node, or N node processes behind a supervisor."""

from __future__ import annotations

import argparse

from smtpfleet.config import load_config


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.workers > 1:
        from smtpfleet.supervisor import serve_workers

        return serve_workers(config, args.config, args.workers, args.log_level, args.log_format)
    from smtpfleet.lifecycle import serve

    return serve(config)
