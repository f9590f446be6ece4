from __future__ import annotations

from pathlib import Path

import pytest

from smtpfleet.config import Durability, build_config, domain_name, load_config, parse_hostport
from smtpfleet.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "smtpfleet.yaml"


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE, environ={})
    assert [r.name for r in config.relays] == ["relay-a", "relay-b", "standby"]


def test_environment_overrides_file_values_including_list_items() -> None:
    config = load_config(
        EXAMPLE,
        environ={
            "SMTPFLEET_QUEUE__DURABILITY": "fsync",
            "SMTPFLEET_RELAYS__1__PORT": "2526",
            "SMTPFLEET_INBOUND__LISTEN": '["127.0.0.1:25", "[::1]:25"]',
            "UNRELATED": "x",
        },
    )
    assert config.queue.durability is Durability.FSYNC
    assert config.relays[1].port == 2526
    assert config.inbound.listen == ["127.0.0.1:25", "[::1]:25"]


def test_every_problem_is_reported_at_once_naming_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "queue": {"durability": "sometimes"},
                "inbound": {"max_recipients": 5, "relay_networks": ["not-a-net"]},
                "relays": [{"name": "a", "host": "h"}, {"name": "a", "host": "h2"}],
                "typo_section": {},
            }
        )
    message = str(caught.value)
    for key in (
        "queue.durability",
        "inbound.max_recipients",
        "inbound.relay_networks",
        "relays",
        "typo_section",
    ):
        assert key in message


def test_claim_idle_must_exceed_the_longest_attempt() -> None:
    with pytest.raises(ConfigError, match="claim_idle_s"):
        build_config({"delivery": {"claim_idle_s": 30, "command_timeout_s": 60}})


@pytest.mark.parametrize(
    ("socket_timeout_s", "wanted_ms", "waits_ms"),
    [
        (5.0, 1000, 1000),  # the defaults: the whole wait fits
        (5.0, 9000, 3750),  # a quarter left for the answer
        (1.0, 1000, 750),  # the drills' socket timeout
        (0.4, 1000, 150),  # at least 0.25 s left
        (0.2, 1000, 1),  # never 0, which to BLOCK would mean for ever
    ],
)
def test_a_wait_inside_redis_leaves_the_answer_time_within_the_socket_timeout(
    socket_timeout_s: float, wanted_ms: int, waits_ms: int
) -> None:
    config = build_config({"redis": {"socket_timeout_s": socket_timeout_s}})
    assert config.redis.server_wait_ms(wanted_ms) == waits_ms


def test_the_receiving_budget_holds_at_least_one_message() -> None:
    with pytest.raises(ConfigError, match="max_receiving_bytes"):
        build_config({"inbound": {"max_message_bytes": 2_000_000, "max_receiving_bytes": 1_000}})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"redis\.shards"):
        build_config({}, {"SMTPFLEET_REDIS__SHARDS": "many"})


def test_unreadable_or_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"cannot read config file .*: not UTF-8 text \(byte 5\)"):
        load_config(latin1, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:25", ("127.0.0.1", 25)), ("[::1]:2525", ("::1", 2525)), ("relay:1", ("relay", 1))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", ":25", "host:", "host:99999", "host:x"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_hostport(text)


def test_tool_variables_are_not_mistaken_for_config_keys() -> None:
    tools = {"SMTPFLEET_PARENT_PID": "1", "SMTPFLEET_LOG_LEVEL": "DEBUG", "SMTPFLEET_WORKERS": "2"}
    config = build_config({}, tools)
    assert config.redis.shards == 16
    with pytest.raises(ConfigError, match="typo"):
        build_config({}, {"SMTPFLEET_TYPO": "1"})


def test_http_listens_on_a_port_or_a_unix_socket() -> None:
    assert build_config({"http": {"listen": "unix:/run/w1.sock"}}).http.unix_path == "/run/w1.sock"
    assert build_config({"http": {"listen": "127.0.0.1:9125"}}).http.unix_path is None
    with pytest.raises(ConfigError, match="unix:/ABSOLUTE/PATH"):
        build_config({"http": {"listen": "unix:w1.sock"}})


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("Example.COM.", "example.com"),
        (" mail.example.net ", "mail.example.net"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_a_domain_name_is_spelled_as_dns_has_it(text: str, domain: str) -> None:
    assert domain_name(text) == domain


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "a..example",
        "localhost",
        "a_b.example",
        "-a.example",
        "x" * 64 + ".example",
        "a b.example",
    ],
)
def test_what_is_not_a_domain_name_says_so(text: str) -> None:
    with pytest.raises(ValueError, match="is not a domain name"):
        domain_name(text)


@pytest.mark.parametrize(
    "url",
    [
        "http://secret@redis.example",
        "redis://:secret@[::1",
        "redis://:secret@localhost:99999/0",
        "x",
    ],
)
def test_a_url_redis_cannot_take_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.url") as caught:
        build_config({"redis": {"url": url}})
    assert "secret" not in str(caught.value)


def test_redis_urls_of_every_kind_are_taken() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@[::1]:6380/1", "unix:///run/redis.sock"):
        assert build_config({"redis": {"url": url}}).redis.url == url


def test_accepted_domains_are_domain_names() -> None:
    inbound = build_config({"inbound": {"accepted_domains": [" Example.NET. ", "localhost"]}})
    assert inbound.inbound.accepted_domains == ["example.net", "localhost"]
    for typo in ("example..net", "[192.0.2.1]", "exa mple.net", ""):
        with pytest.raises(ConfigError, match=r"inbound\.accepted_domains"):
            build_config({"inbound": {"accepted_domains": [typo]}})
