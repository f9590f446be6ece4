"""A sink relay as its own process, whose record a drill can read over HTTP.

A drill against a running cluster (`smtpfleet drill --target FILE`) sends tagged mail through
the real nodes and must count what arrived: it reconciles at relays like this one, which the
operator points the cluster at (a Deployment in Kubernetes, a process beside a local cluster).

    python -m smtpfleet.testing.recording_relay --smtp 127.0.0.1:2525 --http 127.0.0.1:8025
    python -m smtpfleet.testing.recording_relay control http://127.0.0.1:8025 listening=0

HTTP, GET only: `/received?from=N` returns the accepted messages from the N-th on (sender,
recipients, the Message-IDs in the message, arrival wall time) and the refusal counts;
`/control?listening=0|1&delay_s=S` stops or restarts the SMTP listener (a relay that went
away; the record is kept) or slows every reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

from smtpfleet.testing.sink import ReceivedMessage, Sink

MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
HTTP_TIMEOUT_S = 5.0


def describe(message: ReceivedMessage, wall_offset_s: float) -> dict[str, Any]:
    """What a drill needs of a message: who, to whom, which Message-IDs (its own first, then
    those of a bounced original inside a DSN) and when (unix time)."""
    return {
        "sender": message.sender,
        "recipients": list(message.recipients),
        "message_ids": [m.decode(errors="replace") for m in MESSAGE_ID.findall(message.data)],
        "at_unix": round(message.at + wall_offset_s, 6),
    }


class RecordingRelay:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._record: list[ReceivedMessage] = []
        self._wall_offset_s = time.time() - time.monotonic()

    def received(self, start: int) -> dict[str, Any]:
        self._record.extend(list(self.sink.messages)[len(self._record) :])
        return {
            "total": len(self._record),
            "messages": [describe(m, self._wall_offset_s) for m in self._record[start:]],
            "refused_recipients": len(self.sink.refused_recipients),
            "rejected": len(self.sink.rejected),
        }

    async def control(self, query: dict[str, str]) -> dict[str, Any]:
        if "delay_s" in query:
            self.sink.faults.delay_s = float(query["delay_s"])
        if query.get("listening") == "0":
            await self.sink.stop()
        elif query.get("listening") == "1" and not self.sink.serving:
            await self.sink.start()
        return {"listening": self.sink.serving, "delay_s": self.sink.faults.delay_s}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, ValueError):
            async with asyncio.timeout(HTTP_TIMEOUT_S):
                line = (await reader.readline()).decode()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            target = urllib.parse.urlsplit(line.split(" ")[1])
            query = dict(urllib.parse.parse_qsl(target.query))
            if target.path == "/received":
                body, status = self.received(int(query.get("from", "0"))), "200 OK"
            elif target.path == "/control":
                body, status = await self.control(query), "200 OK"
            else:
                body, status = {"error": "not found"}, "404 Not Found"
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        writer.close()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(smtp: str, http: str, name: str) -> None:
    host, port = _hostport(smtp)
    sink = Sink(host, port, name=name, pipelining=True)  # as real relays: the path they get
    await sink.start()
    relay = RecordingRelay(sink)
    http_host, http_port = _hostport(http)
    server = await asyncio.start_server(relay.handle, http_host, http_port)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"smtp": sink.address, "http": f"{http_host}:{bound}"}), flush=True)
    async with server:
        await server.serve_forever()


def control(url: str, settings: list[str]) -> dict[str, Any]:
    """`/control` on a running recording relay (what a target file's fault commands call)."""
    query = urllib.parse.urlencode(dict(s.split("=", 1) for s in settings))
    with urllib.request.urlopen(f"{url}/control?{query}", timeout=HTTP_TIMEOUT_S) as reply:  # noqa: S310 - an http URL the operator named
        result: dict[str, Any] = json.loads(reply.read())
    return result


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "control":
        print(json.dumps(control(args[1], args[2:])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m smtpfleet.testing.recording_relay")
    parser.add_argument("--smtp", default="127.0.0.1:0")
    parser.add_argument("--http", default="127.0.0.1:0")
    parser.add_argument("--name", default="relay")
    options = parser.parse_args(args)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options.smtp, options.http, options.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
