"""inbound.listeners, tls, auth and trusted_proxies: validated once, naming the key."""

from __future__ import annotations

import pytest

from smtpfleet.config import ListenerProfile, build_config
from smtpfleet.errors import ConfigError

TLS = {"cert_file": "/tls/tls.crt", "key_file": "/tls/tls.key"}


def test_legacy_listen_is_one_mx_listener_each() -> None:
    config = build_config({"inbound": {"listen": ["127.0.0.1:25", "[::1]:25"]}})
    listeners = config.inbound.all_listeners()
    assert [x.address for x in listeners] == ["127.0.0.1:25", "[::1]:25"]
    assert all(x.profile is ListenerProfile.MX for x in listeners)


def test_listeners_alone_replace_the_default_listen() -> None:
    tree = {"inbound": {"listeners": [{"address": "0.0.0.0:25"}], "tls": TLS}}
    assert build_config(tree).inbound.listen_addresses() == [("0.0.0.0", 25)]


def test_listen_and_listeners_together() -> None:
    tree = {"inbound": {"listen": ["0.0.0.0:2525"], "listeners": [{"address": "0.0.0.0:25"}]}}
    assert build_config(tree).inbound.listen_addresses() == [("0.0.0.0", 2525), ("0.0.0.0", 25)]


def test_environment_sets_a_listener() -> None:
    env = {"SMTPFLEET_INBOUND__LISTENERS": '[{address: "0.0.0.0:465", implicit_tls: true}]'}
    env |= {"SMTPFLEET_INBOUND__TLS__CERT_FILE": "/c", "SMTPFLEET_INBOUND__TLS__KEY_FILE": "/k"}
    (listener,) = build_config({}, env).inbound.all_listeners()
    assert listener.implicit_tls


@pytest.mark.parametrize(
    ("inbound", "message"),
    [
        ({"listeners": [{"address": "0.0.0.0:465", "implicit_tls": True}]}, "tls.cert_file"),
        ({"listeners": [{"address": "0.0.0.0:25", "require_tls": True}]}, "tls.cert_file"),
        ({"listeners": [{"address": "0:587", "profile": "submission"}], "tls": TLS}, "users_file"),
        ({"listeners": [{"address": "0.0.0.0:25", "proxy_protocol": True}]}, "trusted_proxies"),
        ({"listeners": [{"address": "nowhere"}]}, "inbound.listeners.0.address"),
        ({"listeners": [{"address": "0.0.0.0:25", "profile": "relay"}]}, "profile"),
        ({"tls": {"cert_file": "/c"}}, "key_file go together"),
        ({"tls": {"ticket_key_file": "/k"}}, "ticket_key_file needs cert_file"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies"),
        ({"listen": []}, "no listener"),
    ],
)
def test_invalid_listener_settings_name_the_key(inbound: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"inbound": inbound})
