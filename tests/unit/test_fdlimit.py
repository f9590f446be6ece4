"""The descriptors a configuration needs, and the start-up warning that names the key."""

from __future__ import annotations

import logging
import resource

import pytest

from smtpfleet.config import Config
from smtpfleet.fdlimit import OTHER_FDS, needed_fds, raise_fd_limit


def config(max_sessions: int) -> Config:
    return Config.model_validate(
        {
            "inbound": {"max_sessions": max_sessions},
            "relays": [{"name": "a", "host": "h", "max_connections": 10}],
            "redis": {"max_connections": 20},
        }
    )


def test_sessions_relays_and_redis_count() -> None:
    assert needed_fds(config(10_000)) == 10_000 + 10 + 20 + OTHER_FDS


def test_a_limit_below_the_need_is_a_warning_naming_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with caplog.at_level(logging.INFO, logger="smtpfleet.fdlimit"):
        limit = raise_fd_limit(config(10_000_000))
    assert limit == hard  # raised to the hard limit
    assert "inbound.max_sessions" in caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
