"""Sessions built by our constructor equal those built by aiosmtpd's, attribute by attribute.

inbound/session_init.py copies aiosmtpd 1.4.6's `SMTP.__init__` without its per-session
introspection; if an aiosmtpd release changes that constructor, this fails first.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import weakref
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from smtpfleet.config import InboundConfig
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.policy import RecipientPolicy
from smtpfleet.inbound.server import InboundSMTP
from smtpfleet.inbound.session_init import init_session
from smtpfleet.metrics import Metrics
from smtpfleet.testing.inbound import MemorySpool


def _handler() -> InboundHandler:
    config = InboundConfig(accepted_domains=["example.net"])
    return InboundHandler(
        spool=MemorySpool(),
        policy=RecipientPolicy.from_config(config),
        hostname="mx.test",
        shards=4,
        max_recipients=100,
        max_received_headers=30,
        accept_timeout_s=1.0,
        metrics=Metrics(),
    )


def _comparable(value: Any, session: object) -> Any:
    """Objects made per session compare by kind, methods by function and owner (the session
    itself or another object); containers item by item; everything else by value."""
    if inspect.ismethod(value):
        owner = "session" if value.__self__ is session else value.__self__
        value = ("method", value.__func__, owner)
    elif isinstance(value, tuple):
        value = tuple(_comparable(v, session) for v in value)
    elif isinstance(value, dict):
        value = {k: _comparable(v, session) for k, v in value.items()}
    else:
        value = _per_session.get(type(value), lambda v: v)(value)
    return value


_per_session: dict[type, Any] = {
    asyncio.StreamReader: lambda v: ("StreamReader", v._limit),
    asyncio.Future: lambda v: ("Future", v.done()),
    weakref.ref: lambda v: ("weakref", type(v()).__name__),
}


SETTINGS: list[dict[str, Any]] = [
    {"hostname": "mx.test", "ident": "ESMTP smtpfleet", "data_size_limit": 1000, "timeout": 5},
    {
        "hostname": "mx.test",
        "tls_context": ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
        "require_starttls": True,
        "auth_required": True,
        "auth_exclude_mechanism": ["LOGIN"],
        "command_call_limit": {"*": 7, "NOOP": 3},
        "proxy_protocol_timeout": 5.0,
    },
    {"hostname": "mx.test", "authenticator": lambda *a: None, "command_call_limit": 9},
]


@pytest.mark.parametrize("settings", SETTINGS)
async def test_our_constructor_sets_what_aiosmtpds_sets(settings: dict[str, Any]) -> None:
    handler = _handler()
    theirs = object.__new__(InboundSMTP)
    SMTP.__init__(theirs, handler, **settings)
    ours = object.__new__(InboundSMTP)
    init_session(ours, handler, **settings)
    assert set(vars(ours)) == set(vars(theirs))
    for name, value in vars(theirs).items():
        assert _comparable(getattr(ours, name), ours) == _comparable(value, theirs), name
