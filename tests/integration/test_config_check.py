"""`smtpfleet config check` reads the files a node would use, as the node would read them.

Before, it passed a configuration whose certificate was missing: the node then refused to
start, or (a relay's or Redis's CA bundle, a Redis client certificate) started and failed at
its first connection. Each case here is a real file (or none) and the CLI as its own process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import argon2
import pytest
import yaml

from smtpfleet.testing.client import run_cli
from smtpfleet.testing.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.timeout(60)

HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def _config(certs: TlsFiles, users: Path) -> dict[str, Any]:
    return {
        "inbound": {
            "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
            "auth": {"users_file": str(users)},
        },
        "relays": [{"name": "a", "host": "127.0.0.1", "tls_ca_file": str(certs.ca_file)}],
        "redis": {
            "url": "rediss://localhost:6380/0",
            "tls_ca_file": str(certs.ca_file),
            "tls_cert_file": str(certs.cert_file),
            "tls_key_file": str(certs.key_file),
        },
    }


async def _check(tmp_path: Path, config: dict[str, Any]) -> tuple[int, str, str]:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return await run_cli("config", "check", str(path))


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"alice:{HASHER.hash('secret')}\n", encoding="utf-8")
    return path


@pytest.fixture
def other(tmp_path: Path) -> TlsFiles:
    """A second CA and certificate: its key does not match the first certificate."""
    return make_tls_files(tmp_path / "other")


async def test_usable_files_pass(tmp_path: Path, certs: TlsFiles, users: Path) -> None:
    code, out, err = await _check(tmp_path, _config(certs, users))
    assert code == 0, err
    assert ": ok: " in out


@pytest.mark.parametrize(
    ("section", "key", "bad", "said"),
    [
        (("inbound", "tls"), "cert_file", "missing", "missing.pem with "),
        (("inbound", "tls"), "cert_file", "garbage", "garbage.pem with "),
        (("inbound", "tls"), "key_file", "other key", "key does not belong to the certificate"),
        (("inbound", "auth"), "users_file", "missing", "inbound.auth.users_file: [Errno 2]"),
        (("inbound", "auth"), "users_file", "garbage", "inbound.auth.users_file: "),
        (("relays", 0), "tls_ca_file", "garbage", "relays.0.tls_ca_file: cannot use "),
        (("redis",), "tls_ca_file", "missing", "redis.tls_ca_file: cannot use "),
        (("redis",), "tls_key_file", "other key", "redis.tls_cert_file: cannot use "),
    ],
)
async def test_a_file_a_node_could_not_use_is_named(
    tmp_path: Path,
    certs: TlsFiles,
    other: TlsFiles,
    users: Path,
    section: tuple[str | int, ...],
    key: str,
    bad: str,
    said: str,
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n", encoding="utf-8")
    files = {"missing": tmp_path / "missing.pem", "garbage": garbage, "other key": other.key_file}
    config = _config(certs, users)
    node: Any = config
    for part in section:
        node = node[part]
    node[key] = str(files[bad])
    code, out, err = await _check(tmp_path, config)
    assert code == 2, out
    assert said in err
    assert "Traceback" not in err
    assert "not a PEM file" not in err  # a file's content is never echoed


async def test_skip_files_checks_the_configuration_alone(tmp_path: Path, certs: TlsFiles) -> None:
    config = _config(certs, tmp_path / "not-mounted-here")
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, out, err = await run_cli("config", "check", "--skip-files", str(path))
    assert code == 0, err
    assert ": ok: " in out
