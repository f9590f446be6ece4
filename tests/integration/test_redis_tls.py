"""A node on a Redis it reaches over TLS as an ACL user (`rediss://user:pass@...` + a CA file),
and the clear refusals when the CA or the password is wrong (no retrying, no traceback).

The server is Debian's redis-server (built with TLS): the wheel's Valkey is built without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpfleet.errors import RedisAccessDenied
from smtpfleet.testing import eventually, node_config, run_cli, running_node, send
from smtpfleet.testing.redis_server import AclUser, RedisServer
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles, make_tls_files
from smtpfleet.testing.tools import need_tls_redis_server

pytestmark = pytest.mark.timeout(60)

PREFIX = "tlsq"
# What docs/security.md tells operators to grant: the node's keys, no @dangerous command but
# INFO (the start-up check reads it).
NODE_USER = AclUser("smtpfleet", "s3cret/pass", (f"~{{{PREFIX}*", "+@all", "-@dangerous", "+info"))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    with RedisServer(tls=tls_files, users=[NODE_USER], binary=need_tls_redis_server()) as server:
        yield server


def url_with(server: RedisServer, password: str) -> str:
    # The password has a "/": written in a URL it must be percent-encoded.
    return server.url.replace("rediss://", f"rediss://{NODE_USER.name}:{password}@").replace(
        "s3cret/pass", "s3cret%2Fpass"
    )


def redis_settings(server: RedisServer, ca_file: Path, password: str) -> dict[str, Any]:
    return {
        "url": url_with(server, password),
        "tls_ca_file": str(ca_file),
        "prefix": PREFIX,
        "shards": 4,
    }


async def test_a_node_accepts_and_delivers_over_redis_tls_as_an_acl_user(
    tls_redis: RedisServer, tls_files: TlsFiles, sink: Sink
) -> None:
    settings = redis_settings(tls_redis, tls_files.ca_file, NODE_USER.password)
    config = node_config(tls_redis.url, [sink.address], {"redis": settings})
    async with running_node(config) as node:
        reply = await send(node.inbound.addresses[0])
        assert reply.code == 250, reply
        await eventually(lambda: sink.count == 1)
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_a_wrong_password_stops_the_start_at_once(
    tls_redis: RedisServer, tls_files: TlsFiles
) -> None:
    settings = redis_settings(tls_redis, tls_files.ca_file, "wrong")
    config = node_config(tls_redis.url, [], {"redis": settings})
    with pytest.raises(RedisAccessDenied, match="authentication refused"):
        async with running_node(config):
            pass


async def test_a_server_certificate_from_another_ca_stops_serve_with_a_clear_error(
    tls_redis: RedisServer, tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other-ca")  # a CA that did not sign the server's
    settings = redis_settings(tls_redis, stranger.ca_file, NODE_USER.password)
    config = {
        "redis": settings,
        "inbound": {"listen": ["127.0.0.1:0"]},
        "http": {"listen": ""},
        "node": {"startup_timeout_s": 30},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = await run_cli("serve", "--config", str(path), timeout_s=20)
    assert code == 1, err
    assert "cannot start" in err
    assert "TLS certificate is not trusted (redis.tls_ca_file)" in err
    assert "Traceback" not in err
    assert "s3cret" not in err  # never the credentials
