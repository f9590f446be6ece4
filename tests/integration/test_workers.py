"""`serve --workers N`: worker processes share one SMTP port, one HTTP port, one lifecycle."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from smtpfleet.config import load_config
from smtpfleet.supervisor import Supervisor, Worker
from smtpfleet.testing import eventually, run_cli, send
from smtpfleet.testing.localcluster import LocalCluster, NodeProcess
from smtpfleet.testing.redis_server import RedisServer, free_port
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(120)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def http_get(port: int, path: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, get)


async def ready(port: int) -> None:
    for _ in range(200):
        if (await http_get(port, "/readyz"))[0] == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("not ready in 20 s")


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{"):
            found = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if found == wanted:
                return float(value)
    return 0.0


async def test_two_workers_share_the_port_and_report_on_one_http_port(sink: Sink) -> None:
    async with LocalCluster(nodes=1, workers=2, relays=[sink.address]) as cluster:
        node = cluster.node_processes[0]
        workers = children(node.pid)
        assert len(workers) == 2
        assert (await http_get(node.http_port, "/readyz"))[0] == 200
        codes = await asyncio.gather(*(send(node.smtp) for _ in range(60)))
        assert [c.code for c in codes] == [250] * 60
        await eventually(lambda: sink.count == 60, timeout_s=20)

        status, metrics = await http_get(node.http_port, "/metrics")
        assert status == 200
        per_worker = [
            sample(metrics, "smtpfleet_smtp_messages_total", result="queued", worker=w)
            for w in ("1", "2")
        ]
        # The kernel spread 60 connections over both workers, and every message is counted.
        assert sum(per_worker) == 60
        assert min(per_worker) > 0
        assert "smtpfleet_workers_live 2.0" in metrics

        assert cluster.redis is not None
        node.signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, node.wait, 30.0) == 0
        assert not any(alive(pid) for pid in workers)


async def test_a_crashed_worker_is_restarted_and_a_drain_stops_them_all(sink: Sink) -> None:
    async with LocalCluster(nodes=1, workers=2, relays=[sink.address]) as cluster:
        node = cluster.node_processes[0]
        first, second = children(node.pid)
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: len(children(node.pid)) == 2 and first not in children(node.pid))
        await ready(node.http_port)
        metrics = (await http_get(node.http_port, "/metrics"))[1]
        assert "smtpfleet_worker_restarts_total 1.0" in metrics
        assert (await send(node.smtp)).code == 250
        await eventually(lambda: sink.count == 1)
        assert alive(second)  # the others never noticed

        assert cluster.redis is not None
        # `node drain` with the node's own id reaches every worker (ids node-1/w1, node-1/w2).
        assert (await run_cli("node", "drain", "node-1", "--redis", cluster.redis.url))[0] == 0
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, node.wait, 30.0) == 0

        # The request is used up: started again under the same id (a pod restarted in place),
        # the node runs. It drained again at once, for the hour the request lived.
        node.start()
        await node.wait_ready()
        await asyncio.sleep(2.0)  # a few membership ticks, each of which would drain it
        assert node.running, node.log_tail()
        assert (await send(node.smtp)).code == 250
        await eventually(lambda: sink.count == 2)


async def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    with RedisServer(extra_args=["--maxmemory-policy", "allkeys-lru"]) as evicting:
        config = {
            "inbound": {"listen": [f"127.0.0.1:{free_port()}"]},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "redis": {"url": evicting.url},
        }
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(config))
        node = NodeProcess(1, path, tmp_path / "node.log", 0, 0, workers=2)
        node.start()
        code = await asyncio.get_running_loop().run_in_executor(None, node.wait, 60.0)
        assert code == 1
        assert "maxmemory-policy" in node.log_tail(50)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "at least 1"),
        (["--workers", "two"], "at least 1"),
    ],
)
async def test_bad_worker_counts_are_usage_errors(args: list[str], message: str) -> None:
    code, _, err = await run_cli("serve", *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


async def test_workers_need_a_fixed_smtp_port(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump({"inbound": {"listen": ["127.0.0.1:0"]}, "redis": {"url": redis_url}})
    )
    node = NodeProcess(1, path, tmp_path / "node.log", 0, 0, workers=2)
    node.start()
    assert await asyncio.get_running_loop().run_in_executor(None, node.wait, 30.0) == 1
    assert "fixed SMTP ports" in node.log_tail()


async def test_a_second_signal_makes_every_worker_exit_at_once(sink: Sink) -> None:
    async with LocalCluster(nodes=1, workers=2, relays=[sink.address]) as cluster:
        node = cluster.node_processes[0]
        workers = children(node.pid)
        writers = await _transactions_in_progress(node)
        node.signal(signal.SIGTERM)

        async def refuses_new_sessions() -> bool:
            try:
                reader, writer = await asyncio.open_connection(*node.smtp)
            except OSError:
                return False
            try:
                return (await asyncio.wait_for(reader.readline(), 5)).startswith(b"421")
            finally:
                writer.close()

        await eventually(refuses_new_sessions)  # the first SIGTERM took effect: draining
        assert node.running  # ... and waits for the transactions in progress
        node.signal(signal.SIGTERM)
        await _exits_at_once(node, workers)
        for writer in writers:
            writer.close()


async def test_a_worker_that_has_both_signals_pending_still_exits_at_once(sink: Sink) -> None:
    """A worker not scheduled between the two signals (a busy machine) has both pending when
    it runs again: they must not merge into one, which would only drain it. A CI run once
    saw the supervisor still waiting 10 s after the second signal."""
    async with LocalCluster(nodes=1, workers=2, relays=[sink.address]) as cluster:
        node = cluster.node_processes[0]
        workers = children(node.pid)
        writers = await _transactions_in_progress(node)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # neither runs until both signals are pending
        try:
            node.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the supervisor relays it (to stopped workers)
            node.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        await _exits_at_once(node, workers)
        for writer in writers:
            writer.close()


async def _transactions_in_progress(node: NodeProcess) -> list[asyncio.StreamWriter]:
    """Eight sessions mid-transaction, spread over the workers by the kernel: they keep a
    first signal's drain waiting."""
    writers = []
    for _ in range(8):
        reader, writer = await asyncio.open_connection(*node.smtp)
        await reader.readline()
        writer.write(b"EHLO t\r\nMAIL FROM:<a@example.com>\r\n")
        writers.append(writer)
    return writers


async def _exits_at_once(node: NodeProcess, workers: list[int]) -> None:
    code = await asyncio.get_running_loop().run_in_executor(None, node.wait, 10.0)
    assert code == 130, node.log_tail(30)  # FORCED_EXIT, as a single node answers a second
    assert not any(alive(pid) for pid in workers)


async def test_a_signal_while_the_workers_are_started_reaches_every_worker(
    tmp_path: Path, redis_url: str, prefix: str, sink: Sink
) -> None:
    """A SIGTERM that came while the supervisor started its workers reached those started
    already; the one being started, and those after it, ran on with nobody to stop them."""
    document = {
        "inbound": {"listen": [f"127.0.0.1:{free_port()}"]},
        "http": {"listen": ""},
        "redis": {"url": redis_url, "prefix": prefix},
        "relays": [{"name": "sink", "host": sink.host, "port": sink.port}],
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(document))
    supervisor = Supervisor(load_config(str(path)), str(path), 3)
    spawn = supervisor._spawn

    async def signalled_during_the_second(worker: Worker) -> None:
        if worker.index == 2:  # the signal lands while this one's process is being made
            supervisor._on_signal(signal.SIGTERM)
        await spawn(worker)

    supervisor._spawn = signalled_during_the_second  # type: ignore[method-assign]
    try:
        code = await asyncio.wait_for(supervisor.run(), 30)
    finally:
        for worker in supervisor._pool:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()
    assert code == 0
    # The third never started; the first two stopped (a worker signalled before its Python
    # has set its handlers dies of the signal, having done nothing yet).
    assert [w.process is not None for w in supervisor._pool] == [True, True, False]
    codes = [w.process.returncode for w in supervisor._pool if w.process is not None]
    assert all(c in (0, -signal.SIGTERM) for c in codes), codes


async def _greeting(address: tuple[str, int]) -> tuple[str, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*address)
    return (await asyncio.wait_for(reader.readline(), 5)).decode(), writer


async def test_the_session_cap_holds_for_the_node_not_each_worker(sink: Sink) -> None:
    """`inbound.max_sessions` is per node (docs/security.md). Each worker is a whole node
    inside, and with the full cap each, a node with two workers held twice as many."""
    overrides = {"inbound": {"max_sessions": 4}}
    async with LocalCluster(nodes=1, workers=2, relays=[sink.address], overrides=overrides) as c:
        node = c.node_processes[0]
        opened = [await _greeting(node.smtp) for _ in range(12)]
        admitted = [line for line, _ in opened if line.startswith("220")]
        refused = [line for line, _ in opened if line.startswith("421 4.3.2")]
        for _, writer in opened:
            writer.close()
        assert 2 <= len(admitted) <= 4  # each worker admits 2 of those the kernel hands it
        assert len(admitted) + len(refused) == 12
