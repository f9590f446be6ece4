"""`drill --target FILE` reads the file whole and checks every key before anything runs: a bad
file is one TargetError on one line, naming the file, the key and what it expects (a hostile
probe got six different tracebacks out of it before)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smtpfleet.drills.target import TargetError, load_target

pytestmark = pytest.mark.timeout(30)

GOOD = (
    'smtp: ["127.0.0.1:2525"]\n'
    'redis: {url: "redis://127.0.0.1:6379/0"}\n'
    'sinks: ["http://127.0.0.1:8025"]\n'
)


def _refusal(tmp_path: Path, content: bytes | str) -> str:
    path = tmp_path / "target.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(TargetError) as caught:
        load_target(path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a: [1, 2\n", "not valid YAML at line 2, column 1: expected ',' or ']'"),
        (
            'smtp: [2525]\nredis: {url: "redis://127.0.0.1:1/0"}\nsinks: ["http://127.0.0.1:1"]\n',
            "smtp[0]: expected HOST:PORT (a string), not 2525",
        ),
        (
            'smtp: ["127.0.0.1:2525"]\nredis: {url: 5}\nsinks: ["http://127.0.0.1:1"]\n',
            "redis.url: expected a redis:// URL (a string), not 5",
        ),
        (
            'smtp: ["127.0.0.1:2525"]\nredis: {url: "redis://127.0.0.1:1/0", sentinels: [nope]}\n'
            'sinks: ["http://127.0.0.1:1"]\n',
            "redis.sentinels: 'nope': expected HOST:PORT",
        ),
        (
            GOOD + "preset: kubernetes\nkubernetes: {relay_replicas: two}\n",
            "kubernetes.relay_replicas: expected a whole number from 1 to 10000, not 'two'",
        ),
        ("name: x\n", "smtp: missing (a list of HOST:PORT)"),
        ('smtp: "127.0.0.1:2525"\n', "smtp: expected a list of HOST:PORT, not '127.0.0.1:2525'"),
        (GOOD.replace("http://", ""), "sinks[0]: expected an http:// URL, not '127.0.0.1:8025'"),
        (GOOD + "fault: {}\n", "fault: unknown key (known: name, smtp, redis, sinks,"),
        (GOOD + "preset: k8s\n", "preset: expected kubernetes, not 'k8s'"),
        (GOOD + "- a list\n", "not valid YAML at line 4, column 1"),
        ("- smtp\n", "expected a mapping of name, smtp, redis, sinks, ..., not a list"),
    ],
    ids=[
        "yaml-syntax",
        "smtp-int",
        "redis-url-int",
        "sentinel-not-hostport",
        "k8s-replicas-word",
        "missing-keys",
        "smtp-not-a-list",
        "sink-without-scheme",
        "unknown-key",
        "unknown-preset",
        "yaml-structure",
        "not-a-mapping",
    ],
)
def test_a_bad_target_file_is_one_line_naming_the_key_and_what_it_expects(
    tmp_path: Path, content: str, expected: str
) -> None:
    assert expected in _refusal(tmp_path, content)


def test_bytes_that_are_not_text_are_refused_as_such(tmp_path: Path) -> None:
    # The probe's 300 random bytes: UnicodeDecodeError before. Fixed bytes here (0xf0 starts a
    # four-byte sequence that 0x28 cannot continue), and a control character YAML refuses.
    noise = bytes([0xF0, 0x28, 0x8C, 0xBC]) + os.urandom(296)
    assert "not UTF-8 text (byte 0xf0 at offset 0)" in _refusal(tmp_path, noise)
    assert "not valid YAML" in _refusal(tmp_path, GOOD + "name: a\x00b\n")


def test_every_problem_of_a_file_is_named_at_once(tmp_path: Path) -> None:
    content = (
        "smtp: [2525]\n"
        "redis: {url: 5}\n"
        "sinks: [8025]\n"
        "kubernetes: {namspace: mail, sentinel_port: 0}\n"
    )
    problems = _refusal(tmp_path, content).split("; ")
    assert [p.split(":", 1)[0] for p in problems] == [
        "smtp[0]",
        "redis.url",
        "sinks[0]",
        "kubernetes.namspace",  # misspelt: it would have drilled the `default` namespace
        "kubernetes.sentinel_port",
    ]


def test_a_file_no_target_could_be_is_not_read_whole(tmp_path: Path) -> None:
    # `--target /dev/zero` would otherwise fill the memory before the first check.
    assert "larger than 1048576 bytes" in _refusal(tmp_path, b"#" * (1024 * 1024 + 1))


def test_redis_cluster_seeds_fall_under_the_loopback_rule(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    seeds = '{url: "redis://127.0.0.1:7000/0", cluster: true, cluster_nodes: ["192.0.2.7:7001"]}'
    path.write_text(GOOD.replace('{url: "redis://127.0.0.1:6379/0"}', seeds))
    with pytest.raises(TargetError, match=r"names 192\.0\.2\.7: not loopback"):
        load_target(path)


def test_a_good_file_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        GOOD
        + "name: 2024\n"  # YAML reads a number: still a name
        + "preset: kubernetes\n"
        + "kubernetes: {namespace: mail, relay_replicas: 3}\n"
        + "faults: {relay-slow: {inject: 'true', heal: 'false'}}\n"
    )
    target = load_target(path)
    assert (target.name, target.smtp, target.sinks) == (
        "2024",
        [("127.0.0.1", 2525)],
        ["http://127.0.0.1:8025"],
    )
    assert target.faults["relay-down"].heal == (
        "kubectl --namespace mail scale deployment/smtpfleet-relay --replicas=3"
    )
    assert (target.faults["relay-slow"].inject, target.faults["relay-slow"].heal) == (
        "true",
        "false",
    )
