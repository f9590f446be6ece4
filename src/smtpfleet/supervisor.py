"""`smtpfleet serve --workers N`: N node processes behind one SMTP port, one HTTP port.

One Python process uses one core (PEERS.md), so a pod on a many-core machine runs several
workers, as uvicorn and gunicorn do. Each worker is a whole node (SMTP front, delivery,
membership) with its own id ``ID/wK``; every one binds the same SMTP addresses with
SO_REUSEPORT and the kernel spreads connections between them. The supervisor binds the HTTP
port: /metrics merges every worker's series with a ``worker`` label, /readyz is ready when
every worker is, /healthz when the supervisor runs.

Signals: the first SIGTERM/SIGINT is passed on (each worker drains); a second one is passed
on too (each exits at once). A worker that crashes after it was ready is restarted, with a
growing pause when it keeps crashing; one that fails its start before ever being ready stops
the whole process with exit 1 (a bad Redis or port is not fixed by retrying here). A worker
that drained and exited 0 (`smtpfleet node drain`) is not restarted; when all have, the
supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from smtpfleet import http
from smtpfleet.config import WORKERS_ENV, Config
from smtpfleet.http import HttpServer
from smtpfleet.inbound.tls_tickets import KEY_BYTES, TicketKeyError, set_ticket_key
from smtpfleet.lifecycle import (
    EXIT_OK,
    EXIT_STARTUP_FAILED,
    FORCED_EXIT,
    PARENT_PID_ENV,
    watch_parent,
)

log = logging.getLogger(__name__)

POLL_S = 0.5
RESTART_PAUSES_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 30.0  # a worker up this long resets its restart pause


@dataclass
class Worker:
    """One node process of `serve --workers N`, and what the supervisor knows of it."""

    index: int
    node_id: str
    socket_path: str
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    was_ready: bool = False
    crashes: int = 0
    reason: str = "starting"


def worker_shares(config: Config, workers: int) -> dict[str, str]:
    """Each worker's share of the node's session cap and receiving budget (their settings,
    as environment variables). Each worker is a whole node inside: with the full numbers, a
    node with `--workers 2` held twice `inbound.max_sessions` and could hold twice
    `inbound.max_receiving_bytes` in memory, past the pod's limit these are sized for. The
    kernel spreads connections over the workers, so a worker may refuse while another still
    has room: the cap holds for the node, a little below it at worst."""
    inbound = config.inbound
    sessions = -(-inbound.max_sessions // workers)
    budget = max(inbound.max_message_bytes, inbound.max_receiving_bytes // workers)
    return {
        "SMTPFLEET_INBOUND__MAX_SESSIONS": str(sessions),
        "SMTPFLEET_INBOUND__MAX_RECEIVING_BYTES": str(budget),
    }


@dataclass
class Supervisor:
    """Runs N node processes on one SMTP port, merges their /metrics, restarts crashed ones."""

    config: Config
    config_path: str | None
    workers: int
    log_level: str = "INFO"
    log_format: str = "auto"
    _pool: list[Worker] = field(init=False)
    _exit_code: int = field(init=False, default=EXIT_OK)
    _stop: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="smtpfleet-workers-")
        base = self.config.node.id or f"{socket.gethostname()}-{os.getpid()}"
        self._pool = [
            Worker(i, f"{base}/w{i}", str(Path(self._tmp.name) / f"w{i}.sock"))
            for i in range(1, self.workers + 1)
        ]
        self._ticket_key_file = self._shared_ticket_key()
        self.registry = CollectorRegistry()
        self._restarts = Counter(
            "smtpfleet_worker_restarts",
            "Worker processes restarted after a crash",
            registry=self.registry,
        )
        self._live = Gauge(
            "smtpfleet_workers_live", "Worker processes running", registry=self.registry
        )

    def _shared_ticket_key(self) -> str | None:
        """One TLS ticket key for all the workers (none configured): a sender that comes back
        resumes its session on whichever worker the kernel hands its connection to."""
        tls = self.config.inbound.tls
        if not tls.cert_file or tls.ticket_key_file:
            return None
        key = os.urandom(KEY_BYTES)
        try:
            set_ticket_key(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), key)
        except TicketKeyError as exc:
            log.warning("workers keep a TLS ticket key each: %s", exc)
            return None
        path = Path(self._tmp.name) / "ticket.key"  # in our own 0700 directory
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(key)
        return str(path)

    @property
    def _stopping(self) -> bool:
        return self._stop.is_set()

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        front = self._http()
        try:
            if front is not None:
                await front.start()
            for worker in self._pool:
                if self._stopping:
                    break  # a signal came while the first were started: no more
                await self._spawn(worker)
            background = [
                asyncio.create_task(self._poll_readiness()),
                asyncio.create_task(watch_parent(self._stop_all)),
            ]
            await asyncio.gather(*(self._keep(w) for w in self._pool if w.process is not None))
            for task in background:
                task.cancel()
        finally:
            if front is not None:
                await front.close()
            self._tmp.cleanup()
        log.info("all %d workers stopped", self.workers)
        return self._exit_code

    def _http(self) -> HttpServer | None:
        if not self.config.http.listen:
            return None
        return HttpServer(
            self.config.http,
            registry=self.registry,
            not_ready_reason=self.not_ready_reason,
            metrics_text=self.metrics_text,
        )

    def _child_env(self, worker: Worker) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != WORKERS_ENV}
        env["SMTPFLEET_NODE__ID"] = worker.node_id
        env["SMTPFLEET_HTTP__LISTEN"] = f"unix:{worker.socket_path}"
        env[PARENT_PID_ENV] = str(os.getpid())  # a worker drains if we die
        env["SMTPFLEET_LOG_LEVEL"], env["SMTPFLEET_LOG_FORMAT"] = self.log_level, self.log_format
        if self._ticket_key_file:
            env["SMTPFLEET_INBOUND__TLS__TICKET_KEY_FILE"] = self._ticket_key_file
        env.update(worker_shares(self.config, self.workers))
        return env

    async def _spawn(self, worker: Worker) -> None:
        command = [sys.executable, "-m", "smtpfleet", "serve"]
        if self.config_path:
            command += ["--config", self.config_path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.socket_path)  # left by a crashed worker
        worker.process = await asyncio.create_subprocess_exec(
            *command, env=self._child_env(worker), stdin=asyncio.subprocess.DEVNULL
        )
        worker.started, worker.ready, worker.reason = time.monotonic(), False, "starting"
        self._live.inc()
        log.info("worker %s started (pid %d)", worker.node_id, worker.process.pid)
        if self._stopping:  # the signal came while it was being started: _stop_all missed it
            worker.process.send_signal(signal.SIGTERM)

    async def _keep(self, worker: Worker) -> None:
        """Wait for the worker to exit; restart it unless it should stay down."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            self._live.dec()
            worker.ready, worker.reason = False, f"exited with {code}"
            if self._stopping or code == EXIT_OK:
                log.info("worker %s exited with %d", worker.node_id, code)
                return
            if not worker.was_ready and code == EXIT_STARTUP_FAILED:
                log.error("worker %s could not start: stopping all workers", worker.node_id)
                self._exit_code = EXIT_STARTUP_FAILED
                self._stop_all()
                return
            await self._pause_before_restart(worker, code)
            if self._stopping:
                return
            self._restarts.inc()
            await self._spawn(worker)

    async def _pause_before_restart(self, worker: Worker, code: int) -> None:
        if time.monotonic() - worker.started >= STABLE_AFTER_S:
            worker.crashes = 0
        pause = RESTART_PAUSES_S[min(worker.crashes, len(RESTART_PAUSES_S) - 1)]
        worker.crashes += 1
        log.error("worker %s exited with %d: restarting in %.1fs", worker.node_id, code, pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), pause)  # a signal cuts the pause

    # -- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if self._stopping:
            log.warning("second signal: workers exit without finishing in-flight work")
            self._exit_code = FORCED_EXIT
            # SIGINT, not a second SIGTERM: a worker not yet scheduled since the first would
            # have both pending, and the kernel keeps one pending signal of each kind, so a
            # second SIGTERM would merge into the first and the worker would only drain.
            self._stop_all(signal.SIGINT)
            return
        log.info("received %s: draining %d workers", signal.Signals(signum).name, self.workers)
        self._stop_all()

    def _stop_all(self, signum: signal.Signals = signal.SIGTERM) -> None:
        """A signal to every worker: the first drains it, a second one makes it exit at once."""
        self._stop.set()
        for worker in self._pool:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    # -- HTTP ---------------------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        if self._stopping:
            return "draining"
        waiting = [f"{w.node_id}: {w.reason}" for w in self._pool if not w.ready]
        return "; ".join(waiting) or None

    async def _poll_readiness(self) -> None:
        while True:
            for worker in self._pool:
                running = worker.process is not None and worker.process.returncode is None
                if running:
                    status, body = await http.get("/readyz", unix_path=worker.socket_path)
                    worker.ready = status == 200
                    worker.was_ready = worker.was_ready or worker.ready
                    if not worker.ready:
                        worker.reason = body.decode(errors="replace").strip() or "no answer"
            await asyncio.sleep(POLL_S)

    async def metrics_text(self) -> bytes:
        """Every worker's series with a `worker` label, and the supervisor's own."""
        texts = await asyncio.gather(
            *(http.get("/metrics", unix_path=w.socket_path) for w in self._pool)
        )
        families: dict[str, Metric] = {}
        for worker, (status, body) in zip(self._pool, texts, strict=True):
            if status != 200:
                continue
            try:
                parsed = list(text_string_to_metric_families(body.decode(errors="replace")))
            except ValueError as exc:  # cut short: the worker died while it answered
                log.warning("worker %s: unreadable /metrics, left out: %s", worker.node_id, exc)
                continue
            _merge(families, parsed, str(worker.index))
        merged = CollectorRegistry()
        merged.register(_Fixed(list(families.values())))
        return generate_latest(merged) + generate_latest(self.registry)


class _Fixed:
    """A collector that yields families already built (prometheus_client's custom collector)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _merge(families: dict[str, Metric], parsed: Iterable[Metric], worker: str) -> None:
    for family in parsed:
        target = families.get(family.name)
        if target is None:
            target = families[family.name] = Metric(family.name, family.documentation, family.type)
        for sample in family.samples:
            labels = {**sample.labels, "worker": worker}
            target.add_sample(sample.name, labels, sample.value, sample.timestamp)


def serve_workers(
    config: Config, config_path: str | None, workers: int, log_level: str, log_format: str
) -> int:
    for host, port in config.inbound.listen_addresses():
        if port == 0:
            log.error("serve --workers needs fixed SMTP ports: %s:0 would differ per worker", host)
            return EXIT_STARTUP_FAILED
    supervisor = Supervisor(config, config_path, workers, log_level, log_format)
    return uvloop.run(supervisor.run())
