"""`smtpfleet loadtest` against a real cluster, reconciling at sinks it runs itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from smtpfleet.testing import LocalCluster, eventually, node_config, run_cli, running_node, send
from smtpfleet.testing.redis_server import free_port
from smtpfleet.testing.sink import Sink

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


async def loadtest(*args: str) -> tuple[int, dict[str, object]]:
    code, out, err = await run_cli("loadtest", *args, "--json", timeout_s=90)
    assert out, err
    return code, json.loads(out)


async def test_loadtest_reconciles_a_clean_run_and_catches_loss() -> None:
    sink_ports = [free_port(), free_port()]
    relays = [f"127.0.0.1:{p}" for p in sink_ports]
    async with LocalCluster(
        nodes=2, relays=relays, overrides={"health": {"interval_s": 0.3}}
    ) as cluster:
        targets = [
            arg for n in cluster.node_processes for arg in ("--target", f"127.0.0.1:{n.smtp_port}")
        ]
        sinks = [arg for r in relays for arg in ("--sink", r)]
        code, report = await loadtest(*targets, *sinks, "--count", "500", "--concurrency", "20")
        assert code == 0, report
        assert report["accepted"] == 500
        assert report["codes"] == {"250": 500}
        recon = report["reconciliation"]
        assert isinstance(recon, dict)
        assert (recon["lost"], recon["duplicated"], recon["misrouted"]) == (0, 0, 0)
        assert recon["delivered"] == 500
        assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}  # type: ignore[arg-type]

        # Listening on a port no relay points at: everything accepted is "lost" to it.
        code, report = await loadtest(
            *targets, "--sink", f"127.0.0.1:{free_port()}", "--count", "20", "--settle", "2"
        )
        assert code == 1
        assert report["reconciliation"]["lost"] == 20  # type: ignore[index]


async def test_loadtest_refuses_remote_targets_without_the_flag() -> None:
    code, _, err = await run_cli("loadtest", "--target", "192.0.2.1:25", "--count", "1")
    assert code == 2
    assert "not loopback" in err


async def test_a_small_redis_pool_makes_senders_wait_not_fail(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    # Regression: redis-py's default pool raised "Too many connections" at its size, which
    # turned good accepts into 451s and finished deliveries into duplicates.
    overrides = {"redis": {"prefix": prefix, "max_connections": 3}}
    async with running_node(node_config(redis_url, [sink.address], overrides)) as node:
        replies = await asyncio.gather(*(send(node.inbound.addresses[0]) for _ in range(40)))
        assert {r.code for r in replies} == {250}
        await eventually(lambda: sink.count == 40, timeout_s=20)

        async def finished() -> bool:
            depth = await node.queue.depth()
            return node.worker.in_flight == 0 and depth == {"stream": 0, "retry": 0, "dead": 0}

        # Every entry finished (acked and deleted): no delivery is left that could repeat one.
        await eventually(finished)
        assert sink.count == 40


async def test_a_ca_without_starttls_or_an_unreadable_ca_is_a_usage_error(tmp_path: Path) -> None:
    target = ("--target", "127.0.0.1:1", "--count", "1")
    code, _, err = await run_cli("loadtest", *target, "--tls-ca", str(tmp_path))
    assert code == 2
    assert "--tls-ca needs --starttls" in err
    code, _, err = await run_cli(
        "loadtest", *target, "--starttls", "--tls-ca", str(tmp_path / "absent.pem")
    )
    assert code == 2
    assert "absent.pem" in err


@pytest.mark.parametrize(
    "bad",
    [
        ("--count", "0"),
        ("--duration", "-1"),
        ("--duration", "nan"),
        ("--rate", "0"),
        ("--size", "-5"),
        ("--per-session", "0"),
        ("--concurrency", "0"),
        ("--settle", "-1"),
    ],
)
async def test_a_number_no_load_can_have_is_a_usage_error(bad: tuple[str, str]) -> None:
    amount = () if bad[0] in ("--count", "--duration") else ("--count", "1")
    code, out, err = await run_cli("loadtest", "--target", "127.0.0.1:1", *amount, *bad)
    assert (code, out) == (2, "")
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"smtpfleet loadtest: error: argument {bad[0]}: ")


async def test_a_target_that_accepts_nothing_fails_the_run() -> None:
    code, out, err = await run_cli(
        "loadtest", "--target", f"127.0.0.1:{free_port()}", "--count", "3"
    )
    assert code == 1
    assert "sent 3, accepted 0" in out
    assert err.strip() == "smtpfleet: no message was accepted by --target"
