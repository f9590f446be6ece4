"""The operator CLI against a running cluster: real processes, real Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from smtpfleet.envelope import shard_of
from smtpfleet.node import Node
from smtpfleet.queue.keys import Keys
from smtpfleet.testing import LocalCluster, eventually, node_config, run_cli, running_node, send
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(90)


async def cli_json(*args: str) -> Any:
    code, out, err = await run_cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_status_queue_and_dead_letter_commands(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    sink.faults.rcpt_replies = {
        "busy@example.net": "451 4.2.1 Mailbox busy",
        "gone@example.net": "550 5.1.1 User unknown",
    }
    overrides = {"redis": {"prefix": prefix}, "retry": {"initial_s": 3600, "max_s": 3600}}
    config = node_config(redis_url, [sink.address], overrides)
    target = ["--redis", redis_url]
    async with running_node(config) as node:
        busy = await send(node.inbound.addresses[0], recipients=["busy@example.net"])
        dead = await send(node.inbound.addresses[0], sender="", recipients=["gone@example.net"])
        busy_qid, dead_qid = busy.text.rsplit(" ", 1)[-1], dead.text.rsplit(" ", 1)[-1]

        async def settled() -> bool:
            stats = await node.queue.stats(10**13)
            return stats["retry"] == 1 and stats["dead"] == 1

        await eventually(settled, timeout_s=10)
        # The key prefix and shard count come from the environment, as on a real node.
        status = await _with_prefix(prefix, "status", *target)
        assert [n["id"] for n in status["nodes"]] == [node.node_id]
        assert status["nodes"][0]["alive"] is True
        assert status["relays"][0]["name"] == "relay-1"
        assert status["relays"][0]["verdict"] == "up"
        assert status["queue"]["retry"] == 1
        assert status["queue"]["dead"] == 1
        counts = {k: v for k, v in status["queue"].items() if k not in ("in_flight_by_node",)}
        assert {k for k, v in counts.items() if type(v) is not int} == {"oldest_age_s"}
        # The Redis it sees: one server, a primary, its version, all four shards on it.
        server_info = redis.Redis.from_url(redis_url).info("server")
        version = server_info.get("valkey_version") or server_info["redis_version"]
        host_port = redis_url.removeprefix("redis://").split("/")[0]
        assert status["redis"]["mode"] == "single"
        assert [
            (p["address"], p["role"], p["version"], p["shards"], p["replicas"])
            for p in status["redis"]["primaries"]
        ] == [(host_port, "primary", version, [0, 1, 2, 3], [])]
        code, table, err = await _raw_with_prefix(prefix, "status", *target)
        assert code == 0, err
        assert "redis: single\nREDIS" in table
        assert [host_port, "primary", version, "4"] in [r.split() for r in table.splitlines()]

        listed = await _with_prefix(prefix, "queue", "list", *target)
        assert {(e["qid"], e["state"]) for e in listed} == {(busy_qid, "retry"), (dead_qid, "dead")}
        shown = await _with_prefix(prefix, "queue", "show", busy_qid, *target)
        assert shown["last_errors"] == {"busy@example.net": "451 4.2.1 Mailbox busy"}
        assert "Received: from" in shown["headers"]

        sink.faults.rcpt_replies = {}
        moved = await _with_prefix(prefix, "queue", "retry", busy_qid, *target)
        assert "retry" in moved["result"]
        await eventually(lambda: sink.count == 1, timeout_s=10)

        requeued = await _with_prefix(prefix, "dead", "requeue", dead_qid, *target)
        assert "requeued" in requeued["result"]
        await eventually(lambda: sink.count == 2, timeout_s=10)

        code, _, err = await _raw_with_prefix(prefix, "queue", "show", busy_qid, *target)
        assert code == 1
        assert err.strip() == f"smtpfleet: no queued message {busy_qid}"


UNKNOWN = "550 5.1.1 User unknown"


async def test_queue_delete_dead_purge_and_requeue_all(
    redis_url: str, prefix: str, redis_client: redis.Redis, sink: Sink
) -> None:
    gone = [f"gone{n}@example.net" for n in range(1, 5)]
    sink.faults.rcpt_replies = dict.fromkeys(gone, UNKNOWN) | {"busy@example.net": "451 4.2.1"}
    overrides = {"redis": {"prefix": prefix}, "retry": {"initial_s": 3600, "max_s": 3600}}
    config = node_config(redis_url, [sink.address], overrides)
    keys = Keys(prefix, config.redis.shards)
    target = ["--redis", redis_url]

    def body_kept(qid: str) -> bool:
        return bool(redis_client.exists(keys.body(shard_of(qid), qid)))

    async with running_node(config) as node:
        busy = await queue_one(node, "sender@example.com", "busy@example.net")
        dead = [await queue_one(node, "", rcpt) for rcpt in gone]  # null sender: no DSN
        await eventually(lambda: waiting(node, retry=1, dead=4), timeout_s=10)
        assert all(body_kept(qid) for qid in [busy, *dead])  # positive control

        deleted = await _with_prefix(prefix, "queue", "delete", busy, *target)
        assert deleted["result"] == "deleted (retry)"
        assert not body_kept(busy)
        assert await waiting(node, retry=0, dead=4)

        purged = await _with_prefix(prefix, "dead", "purge", dead[0], *target)
        assert purged["result"] == "deleted (dead)"
        assert not body_kept(dead[0])
        assert all(body_kept(qid) for qid in dead[1:])
        assert await waiting(node, retry=0, dead=3)

        sink.faults.rcpt_replies = {}
        assert await _with_prefix(prefix, "dead", "requeue", "--all", *target) == {"requeued": 3}
        await eventually(lambda: sink.count == 3, timeout_s=10)
        assert sorted(r for m in sink.messages for r in m.recipients) == gone[1:]
        await eventually(lambda: waiting(node, retry=0, dead=0))

        sink.faults.rcpt_replies = {"late@example.net": UNKNOWN}
        late = await queue_one(node, "", "late@example.net")
        await eventually(lambda: waiting(node, retry=0, dead=1), timeout_s=10)
        assert body_kept(late)
        assert await _with_prefix(prefix, "dead", "purge", "--all", *target) == {"purged": 1}
        assert not body_kept(late)
        assert await waiting(node, retry=0, dead=0)
        assert sink.count == 3  # nothing deleted or purged was ever delivered


async def queue_one(node: Node, sender: str, recipient: str) -> str:
    reply = await send(node.inbound.addresses[0], sender=sender, recipients=[recipient])
    assert reply.code == 250
    return reply.text.rsplit(" ", 1)[-1]


async def waiting(node: Node, *, retry: int, dead: int) -> bool:
    stats = await node.queue.stats(10**13)
    return (stats["ready"], stats["in_flight"], stats["retry"], stats["dead"]) == (
        0,
        0,
        retry,
        dead,
    )


async def _with_prefix(prefix: str, *args: str) -> Any:
    code, out, err = await _raw_with_prefix(prefix, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def _raw_with_prefix(prefix: str, *args: str) -> tuple[int, str, str]:
    return await run_cli(
        *args, env={"SMTPFLEET_REDIS__PREFIX": prefix, "SMTPFLEET_REDIS__SHARDS": "4"}
    )


async def test_errors_are_one_line_never_a_traceback(tmp_path: Path) -> None:
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"# caf\xe9\nredis: {}\n")
    for args in (
        ["status", "--redis", "redis://127.0.0.1:1/0"],
        ["queue", "show", "not-an-id", "--redis", "redis://127.0.0.1:1/0"],
        ["status", "--config", "/nonexistent.yaml"],
        ["serve", "--config", str(not_utf8)],
        ["check-dns", ""],
        ["check-dns", "a..example"],
        ["check-dns", "example.com", "--nameserver", "dns.example"],
        ["status", "--redis", "http://127.0.0.1:1/0"],
    ):
        code, out, err = await run_cli(*args)
        assert code in (1, 2)
        assert out == ""
        assert "Traceback" not in err
        assert err.startswith("smtpfleet: ")


@pytest.mark.parametrize(
    "args", [["status"], ["queue", "list"], ["queue", "list", "--state", "in_flight"]]
)
async def test_a_redis_without_our_queue_is_told_and_left_unwritten(
    args: list[str], redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """The wrong Redis, database or prefix: said in one line, and no consumer groups made."""
    code, out, err = await _raw_with_prefix(prefix, *args, "--redis", redis_url)
    assert (code, out) == (1, "")
    assert err.startswith(f"smtpfleet: no smtpfleet queue under prefix '{prefix}' here"), err
    assert err.count("\n") == 1
    assert redis_client.keys(f"*{prefix}*") == []


@pytest.mark.parametrize(
    "args",
    [
        ["dead", "list", "--limit", "0"],
        ["queue", "list", "--limit", "99999999999999999999"],
        ["serve", "--workers", "²"],
    ],
)
async def test_bad_numbers_are_usage_errors(args: list[str]) -> None:
    code, out, err = await run_cli(*args, "--redis", "redis://127.0.0.1:1/0")
    assert (code, out) == (2, "")
    assert "error: argument" in err
    assert "expected" in err  # ours, which says what a good value is


async def test_an_empty_redis_url_is_refused_not_taken_for_the_default() -> None:
    code, out, err = await run_cli("status", "--redis", "")
    assert (code, out) == (2, "")
    assert "redis.url" in err


@pytest.mark.parametrize(
    "after_s", [0.1, 0.25, 0.4, 2.0], ids=["importing"] * 3 + ["waiting-for-redis"]
)
async def test_ctrl_c_ends_a_cluster_command_in_one_line(after_s: float) -> None:
    """A Redis that never answers, and the operator gives up: while the command waits for
    it, or still while it is imported (the configuration's schema alone takes 0.4 s). There a
    Ctrl-C ended in a traceback and death by SIGINT, or a Rust extension's panic
    (pydantic-core importing `datetime`); a busy CI machine once sent it there."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smtpfleet",
            "status",
            "--redis",
            f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(after_s)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        silent.close()
    assert (proc.returncode, out, err) == (130, b"", b"smtpfleet: interrupted\n")


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--log-level", "NOPE", "status"], {}),
        (["status"], {"SMTPFLEET_LOG_LEVEL": "verbose"}),
        (["status"], {"SMTPFLEET_LOG_FORMAT": "xml"}),
    ],
)
async def test_a_bad_log_setting_is_a_usage_error(args: list[str], env: dict[str, str]) -> None:
    code, out, err = await run_cli(*args, env=env)
    assert (code, out) == (2, "")
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("smtpfleet: error: argument --log-")


async def test_relay_pause_and_node_drain_reach_the_running_cluster() -> None:
    async with Sink(name="a") as a, Sink(name="b") as b:
        overrides = {"health": {"interval_s": 0.3}, "routing": {"key": "message_id"}}
        async with LocalCluster(
            nodes=2, relays=[a.address, b.address], overrides=overrides
        ) as cluster:
            assert cluster.redis is not None
            target = ["--redis", cluster.redis.url]
            code, _, err = await run_cli("relay", "pause", "relay-404", *target)
            assert (code, err.strip()) == (1, "smtpfleet: unknown relay 'relay-404'")
            assert (await run_cli("relay", "pause", "relay-1", *target))[0] == 0
            status = await cli_json("status", *target)
            assert {r["name"]: r["verdict"] for r in status["relays"]}["relay-1"] == "paused"
            # Every node reads the pause within a health interval, and says so.
            for node in cluster.node_processes:
                await eventually(lambda n=node: "paused relays: relay-1" in n.log_path.read_text())
            before = a.count
            for _ in range(10):
                assert (await send(cluster.node_processes[0].smtp)).code == 250
            await eventually(lambda: b.count >= 10, timeout_s=10)
            assert a.count == before
            assert (await run_cli("relay", "resume", "relay-1", *target))[0] == 0

            leaving = cluster.node_processes[1]
            assert (await run_cli("node", "drain", "node-2", *target))[0] == 0
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, leaving.wait, 20.0) == 0
            code, _, err = await run_cli("node", "drain", "node-9", *target)
            assert (code, err.strip()) == (1, "smtpfleet: unknown node 'node-9'")


@pytest.mark.parametrize(
    ("command", "actions"),
    [("dead", ["list", "requeue", "purge"]), ("relay", ["pause", "resume"]), ("node", ["drain"])],
)
async def test_help_names_every_action_and_what_it_does(command: str, actions: list[str]) -> None:
    code, out, _ = await run_cli(command, "--help")
    assert code == 0
    listed = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:4] == "    "}
    assert all(listed.get(action) for action in actions), out  # each with its help text
