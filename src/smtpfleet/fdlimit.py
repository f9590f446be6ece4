"""File descriptors for many sessions: raise the soft limit to the hard limit at start.

Each inbound SMTP session is one descriptor, each pooled relay session and Redis connection
another. Distributions start services with a soft limit of 1024 (systemd, Docker: often a
hard limit of 524288 behind it), far below 10,000 sessions: `accept()` would then fail with
EMFILE under load. The node raises the soft limit as far as it may, logs it, and warns,
naming the key, when even that is below what the configuration can open.
"""

from __future__ import annotations

import logging
import resource

from smtpfleet.config import Config

log = logging.getLogger(__name__)

# Listeners, the HTTP server and its clients, health probes, log files, the event loop.
OTHER_FDS = 128


def needed_fds(config: Config) -> int:
    """The most descriptors this configuration can hold open at once."""
    relays = sum(relay.max_connections for relay in config.relays)
    return config.inbound.max_sessions + relays + config.redis.max_connections + OTHER_FDS


def raise_fd_limit(config: Config) -> int:
    """Soft limit := hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file descriptor limit from %d: %s", soft, exc)
    needed = needed_fds(config)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        log.info("file descriptor limit %s (this configuration needs up to %d)", soft, needed)
    else:
        log.warning(
            "file descriptor limit %d is below the %d that inbound.max_sessions (%d) plus "
            "relay and Redis connections need: lower inbound.max_sessions or raise the hard "
            "limit (ulimit -n, LimitNOFILE=, docker --ulimit nofile=)",
            soft,
            needed,
            config.inbound.max_sessions,
        )
    return int(soft)
