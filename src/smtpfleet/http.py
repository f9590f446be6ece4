"""The node's HTTP port: /metrics (Prometheus text), /healthz (alive), /readyz (can take mail).

GET only, one request per connection: what probes and scrapers need, nothing more.
`/readyz` answers 503 with the reason, so `kubectl describe` says *why* a pod is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from smtpfleet.config import HttpConfig, parse_hostport

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_LINE = 8192


class HttpServer:
    """/metrics, /healthz (alive) and /readyz (ready, or why not) for one node."""

    def __init__(
        self,
        config: HttpConfig,
        *,
        registry: CollectorRegistry,
        not_ready_reason: Callable[[], str | None],
        metrics_text: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        # metrics_text: how `serve --workers` serves every worker's series on one port.
        self._config = config
        self._registry = registry
        self._not_ready_reason = not_ready_reason
        self._metrics_text = metrics_text
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        unix_path = self._config.unix_path
        if unix_path is not None:
            self._server = await asyncio.start_unix_server(
                self._serve, unix_path, limit=MAX_REQUEST_LINE
            )
        else:
            host, port = parse_hostport(self._config.listen)
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_REQUEST_LINE
            )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
            self._server = None

    async def _answer(self, request: bytes) -> tuple[int, str, bytes]:
        method, _, rest = request.decode("latin-1").partition(" ")
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        return await self._route(rest.split(" ", 1)[0].split("?", 1)[0])

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            if self._metrics_text is not None:
                return 200, CONTENT_TYPE_LATEST, await self._metrics_text()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            reason = self._not_ready_reason()
            if reason is None:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", f"not ready: {reason}\n".encode()
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    request = await reader.readline()
                    while (await reader.readline()).strip():
                        pass  # headers: nothing we need
            except (ValueError, asyncio.LimitOverrunError):  # a line over MAX_REQUEST_LINE
                status, kind, body = 400, "text/plain", b"request line or header too long\n"
            else:
                status, kind, body = await self._answer(request)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def get(
    path: str,
    *,
    port: int = 0,
    unix_path: str | None = None,
    timeout_s: float = 2.0,
    host: str = "127.0.0.1",
) -> tuple[int, bytes]:
    """GET from one of our own HTTP ports (127.0.0.1:port, `host`:port or a unix socket), for
    the supervisor and the local cluster; (0, b"") when nothing answers in time."""
    try:
        async with asyncio.timeout(timeout_s):
            if unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(unix_path)
            else:
                reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                response = await reader.read()  # one request per connection: read to close
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return 0, b""
    head, _, body = response.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
