"""The probe's bad inputs through the real command: one line on stderr, exit code 2 (1 for a
node that could not start), never a traceback. Each case here was a silent merge, a
traceback, a multi-line PyYAML report, `maximum recursion depth exceeded` with exit 1, or
`cannot read config file : Is a directory`."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpfleet.testing.client import run_cli

pytestmark = pytest.mark.timeout(60)

EXIT_INVALID = 2
EXIT_STARTUP_FAILED = 1
BASE = "relays:\n- {name: a, host: relay-a.internal}\ninbound:\n  listen: ['127.0.0.1:2525']\n"


async def _check(
    tmp_path: Path, text: str = BASE, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return await run_cli("config", "check", str(path), env=env)


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("smtpfleet: ")
    return lines[0]


async def test_a_section_given_twice_names_the_key_and_both_lines(tmp_path: Path) -> None:
    code, _, err = await _check(tmp_path, BASE + "queue:\n  durability: fsync\nqueue: {}\n")
    line = _one_line(err)
    assert code == EXIT_INVALID
    assert f"{tmp_path / 'node.yaml'}: not valid YAML: line 7, column 1: key 'queue'" in line
    assert "(first at line 5, column 1)" in line


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("redis:\n url: a\n  b: c\n", "line 3, column 4: mapping values are not allowed here"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "line 1, column 35: nested more than 32"),
    ],
    ids=["syntax", "nesting"],
)
async def test_a_file_that_is_not_acceptable_yaml_is_one_line(
    tmp_path: Path, text: str, said: str
) -> None:
    code, _, err = await _check(tmp_path, text)
    assert code == EXIT_INVALID
    path = tmp_path / "node.yaml"
    assert _one_line(err).startswith(f"smtpfleet: {path}: not valid YAML: {said}")
    assert "<unicode string>" not in err


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"SMTPFLEET_DEBUG": "1"}, "SMTPFLEET_DEBUG: not a setting (the configuration has no"),
        (
            {"SMTPFLEET_INBOUND__LISTEN__0__X": "1"},
            "SMTPFLEET_INBOUND__LISTEN__0__X: not a setting (inbound.listen.0 is a single value",
        ),
        (
            {"SMTPFLEET_RELAYS__0__PORT": "0"},
            "SMTPFLEET_RELAYS__0__PORT (relays.0.port): Input should be greater than or equal to 1",
        ),
    ],
    ids=["stray", "under-a-value", "bad-value"],
)
async def test_a_variable_at_fault_is_named(tmp_path: Path, env: dict[str, str], said: str) -> None:
    code, _, err = await _check(tmp_path, env=env)
    assert code == EXIT_INVALID
    assert _one_line(err).startswith(f"smtpfleet: invalid configuration: {said}")


async def test_a_text_variable_is_taken_as_it_is(tmp_path: Path) -> None:
    # Read as YAML, 123456 became a number: "redis.prefix: Input should be a valid string".
    code, out, err = await _check(tmp_path, env={"SMTPFLEET_REDIS__PREFIX": "123456"})
    assert code == 0, err
    assert ": ok: " in out


@pytest.mark.parametrize(
    ("section", "said"),
    [
        ("health:\n  interval_s: .inf\n", "health.interval_s: Input should be a finite number"),
        ('node:\n  hostname: "evil\\r\\n250 x"\n', "node.hostname: Value error, "),
        ("delivery:\n  helo_name: 'bad helo'\n", "delivery.helo_name: Value error, "),
        ("inbound:\n  relay_networks: ['10.0.0.1/8']\n", "write 10.0.0.0/8 for that network"),
        ("redis:\n  url: redis://127.0.0.1:6379/abc\n", "redis.url: Value error, the path"),
        ("bounce:\n  from_address: not an address\n", "bounce.from_address: Value error, "),
    ],
    ids=["inf", "hostname", "helo", "hostbits", "redis-db", "bounce"],
)
async def test_a_value_serve_could_not_use_is_refused(
    tmp_path: Path, section: str, said: str
) -> None:
    text = BASE.replace("inbound:\n  listen: ['127.0.0.1:2525']\n", "") + section
    code, _, err = await _check(tmp_path, text)
    assert code == EXIT_INVALID
    assert said in _one_line(err)


@pytest.mark.parametrize(
    ("relay", "said"),
    [
        ("{name: a, host: ''}", "relays.0.host: Value error, empty"),
        ("{name: a, host: 'relay a'}", "relays.0.host: Value error, 'relay a' is not a host"),
        ("{name: a, host: 'relay:25'}", "relays.0.host: Value error, 'relay:25' is not a host"),
        ("{name: a, host: relay, port: 0}", "relays.0.port: Input should be greater than or"),
    ],
    ids=["empty", "space", "hostport", "port0"],
)
async def test_a_relay_that_cannot_be_reached_is_refused(
    tmp_path: Path, relay: str, said: str
) -> None:
    code, _, err = await _check(tmp_path, f"relays:\n- {relay}\n")
    assert code == EXIT_INVALID
    assert said in _one_line(err)


async def test_an_empty_path_is_no_config_file(tmp_path: Path) -> None:
    code, out, err = await run_cli("config", "check", "", env={"SMTPFLEET_REDIS__SHARDS": "32"})
    assert code == 0, err
    assert "32 shards" in out


async def test_an_empty_smtpfleet_config_is_unset_for_serve(tmp_path: Path) -> None:
    # No file: the defaults and these variables; the node then stops at its Redis, port 1.
    env = {
        "SMTPFLEET_CONFIG": "",
        "SMTPFLEET_REDIS__URL": "redis://127.0.0.1:1/0",
        "SMTPFLEET_NODE__STARTUP_TIMEOUT_S": "0.2",
        "SMTPFLEET_HTTP__LISTEN": "",
    }
    code, _, err = await run_cli("--log-format", "text", "serve", env=env)
    assert "cannot read config file" not in err
    assert "Traceback" not in err
    assert code == EXIT_STARTUP_FAILED
    assert "Redis not reachable at start" in err
