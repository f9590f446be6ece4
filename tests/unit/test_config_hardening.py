"""What a hostile operator's probe got past the config loader (docs/configuration.md).

Each case was accepted, silently changed, or crashed with a traceback: a repeated YAML key
(the last won), environment values read as YAML (a password lost its `#...` tail), a stray
SMTPFLEET_ variable reported as a key of the file, a variable nested under a single value
(TypeError), `.inf` durations that crashed `serve`, CR LF in names that go into SMTP, and
messages that did not say where the problem was.
"""

from __future__ import annotations

import math
import re
import ssl
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import smtpfleet
from smtpfleet.config import RESERVED_ENV, Config, build_config, describe_pair_failure, load_config
from smtpfleet.errors import ConfigError
from smtpfleet.testing.tls import make_tls_files

pytestmark = pytest.mark.timeout(30)

RELAY = {"name": "a", "host": "relay-a.internal"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _problem(tree: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        build_config(tree, environ or {})
    return str(caught.value)


# 1. A key given twice in one mapping.

DUPLICATE_SECTIONS = """\
relays:
  - {name: relay-a, host: relay-a.internal}
  - {name: relay-b, host: relay-b.internal}
queue:
  durability: replicated
# ... later in the file
queue:
  high_water: 500000
"""


def test_a_section_given_twice_is_an_error_naming_it_and_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, DUPLICATE_SECTIONS)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "line 7, column 1: key 'queue' given twice" in message
    assert "(first at line 4, column 1)" in message
    assert "\n" not in message


def test_a_key_given_twice_inside_a_list_item_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "relays:\n  - name: a\n    host: h1\n    host: h2\n")
    with pytest.raises(ConfigError, match=r"line 4, column 5: key 'host' given twice.*line 3"):
        load_config(path, environ={})


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    # Control: `<<` is how YAML shares a block; overriding a merged key is its purpose.
    text = "x-relay: &relay {host: h, port: 2525}\n"
    path = _write(tmp_path, text + "relays:\n  - {<<: *relay, name: a, port: 2526}\n")
    with pytest.raises(ConfigError, match="x-relay"):  # an unknown top-level key, nothing else
        load_config(path, environ={})


def test_a_key_given_twice_in_an_environment_value_is_an_error() -> None:
    message = _problem({}, {"SMTPFLEET_RELAYS": "[{name: a, host: h, host: g}]"})
    assert "SMTPFLEET_RELAYS: not valid YAML: line 1, column 21: key 'host' given twice" in message
    assert "(first at line 1, column 12)" in message


# 2. A text key takes the variable's value as it is.


@pytest.mark.parametrize(
    "text", ["s3cret #2024", "null", "~", "'quoted'", '"quoted"', "123456", "yes", " spaced ", ""]
)
def test_a_text_key_takes_the_value_exactly_as_given(text: str) -> None:
    config = build_config(
        {"relays": [RELAY]},
        {"SMTPFLEET_RELAYS__0__PASSWORD": text, "SMTPFLEET_REDIS__PASSWORD": text},
    )
    assert config.relays[0].password == text
    assert config.redis.password == text


def test_a_choice_is_text_too_and_numbers_lists_and_booleans_are_yaml() -> None:
    config = build_config(
        {"relays": [RELAY]},
        {
            "SMTPFLEET_RELAYS__0__TLS": "none",
            "SMTPFLEET_RELAYS__0__PORT": "2526",
            "SMTPFLEET_REDIS__SHARDS": "32",
            "SMTPFLEET_INBOUND__LISTEN": '["127.0.0.1:25", "[::1]:25"]',
            "SMTPFLEET_INBOUND__LIMITS__EXEMPT_RELAY_NETWORKS": "false",
            "SMTPFLEET_RELAYS__0__TAGS": "[hipaa, eu]",
        },
    )
    relay = config.relays[0]
    assert (relay.tls.value, relay.port, relay.tags) == ("none", 2526, ["hipaa", "eu"])
    assert config.redis.shards == 32
    assert config.inbound.listen == ["127.0.0.1:25", "[::1]:25"]
    assert config.inbound.limits.exempt_relay_networks is False


def test_an_invalid_value_from_the_environment_names_the_variable_and_the_key() -> None:
    message = _problem({"relays": [RELAY]}, {"SMTPFLEET_RELAYS__0__PORT": "70000"})
    assert message == (
        "invalid configuration: SMTPFLEET_RELAYS__0__PORT (relays.0.port): "
        "Input should be less than or equal to 65535"
    )


def test_a_section_rule_names_the_variables_that_took_part() -> None:
    message = _problem({}, {"SMTPFLEET_INBOUND__MAX_RECEIVING_BYTES": "10"})
    assert "inbound: Value error, max_receiving_bytes" in message
    assert "(with SMTPFLEET_INBOUND__MAX_RECEIVING_BYTES from the environment)" in message


def test_a_file_value_is_not_blamed_on_the_environment() -> None:
    message = _problem({"relays": [{**RELAY, "port": 0}]}, {"SMTPFLEET_RELAYS__0__HOST": "x"})
    assert message.endswith(": relays.0.port: Input should be greater than or equal to 1")


# 3. A variable that names no key.


def test_a_stray_variable_is_an_error_naming_it() -> None:
    message = _problem({}, {"SMTPFLEET_DEBUG": "1"})
    assert message == (
        "invalid configuration: SMTPFLEET_DEBUG: not a setting "
        "(the configuration has no key 'debug')"
    )


def test_a_misspelt_key_is_named_with_the_likely_one() -> None:
    message = _problem({}, {"SMTPFLEET_REDIS__URLL": "redis://r/0"})
    assert "SMTPFLEET_REDIS__URLL: not a setting (redis has no key 'urll'; " in message
    assert "did you mean SMTPFLEET_REDIS__URL?" in message


def test_problems_of_the_environment_and_the_file_are_reported_together() -> None:
    message = _problem({"relays": [{**RELAY, "port": 0}]}, {"SMTPFLEET_DEBUG": "1"})
    assert message.splitlines()[1:] == [
        "  SMTPFLEET_DEBUG: not a setting (the configuration has no key 'debug')",
        "  relays.0.port: Input should be greater than or equal to 1",
    ]


def _variables_read_in_src() -> set[str]:
    """Every SMTPFLEET_ name the package mentions that is not a key (`SMTPFLEET_RELAYS`,
    `SMTPFLEET_REDIS__URL`): the command's and the tools' own variables."""
    names: set[str] = set()
    for source in Path(smtpfleet.__file__).parent.rglob("*.py"):
        names |= set(re.findall(r"\bSMTPFLEET_[A-Z0-9]+(?:_[A-Z0-9]+)*\b", source.read_text()))
    sections = {name.upper() for name in Config.model_fields}
    return {n for n in names if "__" not in n and n.removeprefix("SMTPFLEET_") not in sections}


def test_the_variables_the_command_and_tools_read_are_not_settings() -> None:
    read = _variables_read_in_src()
    assert {"SMTPFLEET_CONFIG", "SMTPFLEET_LOG_LEVEL", "SMTPFLEET_KEEP_WORKDIR"} <= read
    assert read <= RESERVED_ENV
    assert build_config({}, dict.fromkeys(RESERVED_ENV, "1")).redis.shards == 16


# 4. A variable that cannot be placed.


@pytest.mark.parametrize(
    ("variable", "said"),
    [
        ("SMTPFLEET_INBOUND__LISTEN__0__X", "not a setting (inbound.listen.0 is a single value"),
        ("SMTPFLEET_REDIS__URL__X", "not a setting (redis.url is a single value"),
        ("SMTPFLEET_RELAYS__A__HOST", "not a setting (relays is a list: an item number"),
        ("SMTPFLEET_RELAYS__3__HOST", "relays has no item 3 (it has 1; the first is 0)"),
        ("SMTPFLEET_QUEUE__CLASSES__0__NAME", "queue.classes has no items to set"),
        ("SMTPFLEET_REDIS____URL", "not a setting (redis has no key ''"),
    ],
)
def test_a_variable_that_cannot_be_placed_is_named(variable: str, said: str) -> None:
    tree = {"relays": [RELAY], "inbound": {"listen": ["127.0.0.1:2525"]}}
    assert _problem(tree, {variable: "1"}).startswith(f"invalid configuration: {variable}: {said}")


def test_a_variable_under_a_value_the_file_gives_as_a_scalar_is_named() -> None:
    message = _problem({"redis": "redis://r/0"}, {"SMTPFLEET_REDIS__URL": "redis://r/1"})
    assert "SMTPFLEET_REDIS__URL: cannot set it: redis is str, not a section" in message


# 5. Values that `config check` passed and `serve` crashed on.


def _bare(annotation: Any) -> Any:
    """`Annotated[X, ...] | None` as X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _keys_of(
    model: type[BaseModel], path: tuple[str, ...] = (), kind: type = float
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, default) of every key of the schema of type `kind`; sections in lists as their
    first item."""
    for name, field in model.model_fields.items():
        annotation = _bare(field.annotation)
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if annotation is kind:
            yield (*path, name), field.get_default()
        elif _is_model(annotation):
            yield from _keys_of(annotation, (*path, name), kind)
        elif _is_model(item):
            yield from _keys_of(item, (*path, name, "0"), kind)


def _tree(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A valid document with `value` at `path` (a list item is a minimal valid one)."""
    items = {"relays": RELAY, "classes": {"name": "bulk"}, "keys": {}, "dkim": {"selector": "s"}}
    tree: dict[str, Any] = {}
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        if path[depth + 1] == "0":
            continue
        if part == "0":
            item = dict(items[path[depth - 1]])
            node[path[depth - 1]] = [item]
            node = item
        else:
            node = node.setdefault(part, {})
    node[path[-1]] = value
    return tree


DEFAULTS = dict(_keys_of(Config))
FLOAT_KEYS = sorted(DEFAULTS)


def test_the_float_keys_include_the_ones_the_probe_crashed_serve_with() -> None:
    dotted = {".".join(p) for p in FLOAT_KEYS}
    assert {
        "redis.socket_timeout_s",
        "inbound.limits.session_lease_s",
        "inbound.auth.failure_window_s",
        "health.interval_s",
        "health.timeout_s",
        "inbound.idle_timeout_s",
        "delivery.claim_idle_s",
        "cluster.lease_s",
        "cluster.lease_refresh_s",
        "queue.classes.0.retry.lifetime_s",
    } <= dotted


@pytest.mark.parametrize("path", FLOAT_KEYS, ids=".".join)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_no_number_of_the_schema_may_be_infinite_or_nan(
    path: tuple[str, ...], value: float
) -> None:
    message = _problem(_tree(path, value))
    assert f"{'.'.join(path)}: Input should be a finite number" in message


def test_the_tree_helper_builds_valid_documents() -> None:
    # Control for the case above: the same documents with a plain value pass.
    for path, default in DEFAULTS.items():
        build_config(_tree(path, 1.0 if default is None else default))


DURATIONS = [p for p in FLOAT_KEYS if p[-1].endswith("_s") and not p[-1].endswith("_per_s")]


@pytest.mark.parametrize("path", DURATIONS, ids=".".join)
def test_a_duration_is_at_most_a_year(path: tuple[str, ...]) -> None:
    assert "less than or equal to" in _problem(_tree(path, 1e300))


def test_a_duration_from_the_environment_is_checked_the_same() -> None:
    message = _problem({}, {"SMTPFLEET_HEALTH__INTERVAL_S": ".inf"})
    assert "SMTPFLEET_HEALTH__INTERVAL_S (health.interval_s): Input should be a finite" in message


INT_KEYS = sorted(dict(_keys_of(Config, kind=int)))


def test_the_int_keys_include_ports_counts_and_sizes() -> None:
    dotted = {".".join(p) for p in INT_KEYS}
    assert {
        "relays.0.port",
        "inbound.max_sessions",
        "inbound.max_message_bytes",
        "delivery.block_ms",
        "queue.durability_timeout_ms",
        "redis.max_connections",
    } <= dotted


@pytest.mark.parametrize("path", INT_KEYS + FLOAT_KEYS, ids=".".join)
@pytest.mark.parametrize("value", [True, False])
def test_a_number_is_not_true_or_false(path: tuple[str, ...], value: bool) -> None:
    # pydantic took `port: true` as port 1 and `drain_grace_s: false` as 0 s.
    message = _problem(_tree(path, value))
    assert f"{'.'.join(path)}: Value error, must not be true or false" in message


@pytest.mark.parametrize("path", INT_KEYS, ids=".".join)
def test_every_count_has_an_upper_bound(path: tuple[str, ...]) -> None:
    # 10**20 passed `config check`; as delivery.block_ms or queue.durability_timeout_ms it is
    # a timeout Redis refuses on every read or accept.
    assert "less than or equal to" in _problem(_tree(path, 10**20))


def test_a_switch_still_takes_true_and_false() -> None:
    config = build_config({"inbound": {"limits": {"exempt_relay_networks": False}}})
    assert config.inbound.limits.exempt_relay_networks is False
    assert build_config({"redis": {"cluster": True}}).redis.cluster is True


def test_the_redis_socket_timeout_has_a_floor() -> None:
    assert "greater than or equal to 0.2" in _problem({"redis": {"socket_timeout_s": 0.1}})
    assert build_config({"redis": {"socket_timeout_s": 0.2}}).redis.socket_timeout_s == 0.2


SMTP_NAMES = [("node", "hostname"), ("delivery", "helo_name")]


@pytest.mark.parametrize(("section", "key"), SMTP_NAMES)
@pytest.mark.parametrize(
    "bad",
    ["evil\r\n250 injected", "evil\nRSET", "bad host", "tab\there", "nul\x00", "x.", "a..b",
     "[999.1.1.1]", "[IPv6:nope]", "-lead.example"],
)  # fmt: skip
def test_a_name_said_in_smtp_has_no_spaces_or_control_characters(
    section: str, key: str, bad: str
) -> None:
    assert f"{section}.{key}: Value error, " in _problem({section: {key: bad}})


@pytest.mark.parametrize(("section", "key"), SMTP_NAMES)
@pytest.mark.parametrize(
    "good", ["mx1.example.com", "localhost", "[192.0.2.1]", "[IPv6:2001:db8::1]", "MX-1.Example"]
)
def test_domain_names_and_address_literals_pass(section: str, key: str, good: str) -> None:
    config = build_config({section: {key: good}})
    assert getattr(getattr(config, section), key) == good


# 6. Other values that were accepted and wrong.


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://127.0.0.1:6379/abc", "a database number (/0), not /abc"),
        ("redis://127.0.0.1:6379/1/2", "not /1/2"),
        ("redis://127.0.0.1:6379/0?db=x", "?db= must be a database number"),
        ("unix:///run/redis.sock?db=one", "?db= must be a database number"),
    ],
)
def test_a_redis_url_names_a_database_by_number(url: str, said: str) -> None:
    assert said in _problem({"redis": {"url": url}})


@pytest.mark.parametrize(
    "url", ["redis://r:6379/0", "redis://r", "redis://r/", "rediss://r/15", "unix:///s?db=2"]
)
def test_good_redis_urls_pass(url: str) -> None:
    assert build_config({"redis": {"url": url}}).redis.url == url


@pytest.mark.parametrize(
    ("host", "said"),
    [
        ("", "empty: the relay's DNS name or IP address is required"),
        ("relay a", "'relay a' is not a host name or IP address"),
        ("relay:25", "'relay:25' is not a host: give the port as `port`"),
        ("[::1]", "'[::1]' is not a host: give the port as `port`, and an IPv6 address without"),
    ],
)
def test_a_relay_host_is_a_name_or_an_address(host: str, said: str) -> None:
    assert f"relays.0.host: Value error, {said}" in _problem({"relays": [{**RELAY, "host": host}]})


@pytest.mark.parametrize("host", ["relay-a.internal", "relay_a", "10.0.0.25", "2001:db8::25"])
def test_good_relay_hosts_pass(host: str) -> None:
    assert build_config({"relays": [{**RELAY, "host": host}]}).relays[0].host == host


def test_a_relay_port_is_one_we_can_connect_to() -> None:
    message = _problem({"relays": [{**RELAY, "port": 0}]})
    assert message == (
        "invalid configuration: relays.0.port: Input should be greater than or equal to 1"
    )


@pytest.mark.parametrize(
    "bad", ["not an address", "a@b, c@d", "Bounces <postmaster@example.org>\r\nBcc: x@y.z", "a@"]
)
def test_the_bounce_sender_is_one_mail_address(bad: str) -> None:
    assert "bounce.from_address: Value error, " in _problem({"bounce": {"from_address": bad}})


@pytest.mark.parametrize(
    "good", ["postmaster@example.org", "Bounces <postmaster@example.org>", '"Mail, Ltd" <p@e.org>']
)
def test_good_bounce_senders_pass(good: str) -> None:
    assert build_config({"bounce": {"from_address": good}}).bounce.from_address == good


@pytest.mark.parametrize("key", ["relay_networks", "trusted_proxies"])
def test_a_network_with_host_bits_names_the_network_meant(key: str) -> None:
    message = _problem({"inbound": {key: ["10.0.0.0/8", "10.0.0.1/8"]}})
    assert f"inbound.{key}: Value error, '10.0.0.1/8' has host bits set: write 10.0.0.0/8" in (
        message
    )
    assert "10.0.0.1/32 for the one host" in message


def test_networks_and_single_addresses_pass() -> None:
    nets = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
    assert build_config({"inbound": {"relay_networks": nets}}).inbound.relay_networks == nets


# 7. Messages that say where.


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("redis:\n url: a\n  b: c\n", "line 3, column 4: mapping values are not allowed here"),
        ("a: [1, 2\n", "line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        ('redis:\n  url: "redis://x\n', "line 3, column 1: found unexpected end of stream"),
        ("\t- x\n", "line 1, column 1: found character '\\t' that cannot start any token"),
        ("a: b\x00\n", "line 1, column 5: character #x0000: special characters are not allowed"),
        ("redis: !!python/object:os.system x\n", "line 1, column 8: could not determine"),
    ],
)
def test_a_yaml_problem_is_one_line_naming_file_line_and_column(
    tmp_path: Path, text: str, said: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML: {said}")
    assert "\n" not in message
    assert "<unicode string>" not in message


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value) == (
        f"{path}: not valid YAML: line 1, column 35: nested more than 32 levels deep"
    )


def test_an_empty_path_is_no_file() -> None:
    assert load_config("", environ={}).redis.shards == 16
    assert load_config("", environ={"SMTPFLEET_REDIS__SHARDS": "32"}).redis.shards == 32


def test_one_problem_is_one_line() -> None:
    assert "\n" not in _problem({"redis": {"shards": 0}})


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    """A good pair, another pair's key, an empty file, a directory, an encrypted key."""
    good, other = make_tls_files(tmp_path / "good"), make_tls_files(tmp_path / "other")
    (tmp_path / "empty.pem").write_bytes(b"")
    (tmp_path / "encrypted.pem").write_bytes(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    return {
        "cert": str(good.cert_file),
        "key": str(good.key_file),
        "other key": str(other.key_file),
        "empty": str(tmp_path / "empty.pem"),
        "directory": str(tmp_path),
        "encrypted": str(tmp_path / "encrypted.pem"),
    }


@pytest.mark.parametrize(
    ("cert", "key", "said"),
    [
        ("key", "cert", "{key} holds a private key, not a certificate (cert_file and key_file"),
        ("cert", "cert", "{cert} holds a certificate, not a private key"),
        ("empty", "empty", "{empty} is empty"),
        ("cert", "empty", "{empty} is empty"),
        ("directory", "key", "{directory}: Is a directory"),
        ("cert", "directory", "{directory}: Is a directory"),
        ("cert", "other key", "the private key does not belong to the certificate"),
        ("cert", "encrypted", "{encrypted} holds an encrypted private key"),
    ],
)
def test_a_certificate_pair_that_cannot_be_loaded_is_explained(
    pem: dict[str, str], cert: str, key: str, said: str
) -> None:
    cert_file, key_file = pem[cert], pem[key]
    with pytest.raises((OSError, ValueError)) as caught:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    message = describe_pair_failure(cert_file, key_file, caught.value)
    assert message.startswith(f"cannot use {cert_file} with {key_file}: ")
    assert said.format(**{k.replace(" ", "_"): v for k, v in pem.items()}) in message
    assert "PEM lib" not in message
    assert "MIIB" not in message  # never the content


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("Bounces <bounces@exämple.com>", "Bounces <bounces@xn--exmple-cua.com>"),
        ("bounces@bücher.example", "bounces@xn--bcher-kva.example"),
        ("Système <p@exämple.com>", "Système <p@xn--exmple-cua.com>"),
    ],
)
def test_an_international_bounce_domain_is_kept_as_its_a_label(given: str, kept: str) -> None:
    """RFC 2047 5(3): no encoded word in an addr-spec, which a U-label in From: became."""
    assert build_config({"bounce": {"from_address": given}}).bounce.from_address == kept


def test_a_non_ascii_local_part_in_the_bounce_sender_is_refused_clearly() -> None:
    message = _problem({"bounce": {"from_address": "Bounces <jörg@example.com>"}})
    assert "bounce.from_address: Value error, " in message
    assert "the local part must be ASCII" in message


@pytest.mark.parametrize("rate", [0.5, 1.5])
def test_a_relay_rate_is_whole_messages_a_second(rate: float) -> None:
    """The budget is counted per second in whole messages: 0.5 let no message through at all
    (1 <= 0.5 is false), and 1.5 was 1. Refused, saying so, rather than either."""
    relay = {"name": "r", "host": "10.0.0.1", "max_messages_per_s": rate}
    with pytest.raises(ConfigError, match=r"max_messages_per_s.*fractional part"):
        build_config({"relays": [relay]}, {})
