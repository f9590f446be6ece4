"""A userspace stand-in for `tc netem`, for kernels built without `sch_netem`.

`python -m smtpfleet.testing.netem --from PORT --to SPARE --delay-ms 200 --loss-percent 5`
runs in a `testing.netns` hub: it forwards Ethernet frames between two interfaces (raw packet
sockets), delaying and dropping the frames that arrive on `--from` (those the member sends, as
netem on the member's own interface would) and passing the others through at once. The frames
keep their GSO metadata (PACKET_VNET_HDR), so TCP segments larger than the MTU cross intact.

It prints "ready" once both sockets are open, then forwards nothing until it reads a line on
stdin, so the caller can take the member's port off the bridge first and the switch costs no
frames (the few the sockets saw meanwhile are sent twice; TCP ignores such duplicates). Each
line "DELAY_MS LOSS_PERCENT" changes the impairment in place; at the end of stdin it exits.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import selectors
import socket
import sys
import time
from typing import TextIO

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23  # our own sends must not come back to us
MAX_FRAME = 65536 + 64
IDLE_WAIT_S = 1.0


def open_port(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.bind((name, 0))
    sock.setblocking(False)
    return sock


class Forwarder:
    """Frames from `impaired` wait `delay_s` and are lost with probability `loss`."""

    def __init__(
        self, impaired: socket.socket, other: socket.socket, delay_s: float, loss: float
    ) -> None:
        self.impaired, self.other = impaired, other
        self.delay_s, self.loss = delay_s, loss
        self._due: list[tuple[float, int, bytes]] = []  # (when, order, frame) to `other`
        self._order = itertools.count()
        self._selector = selectors.DefaultSelector()
        self._selector.register(impaired, selectors.EVENT_READ)
        self._selector.register(other, selectors.EVENT_READ)

    def run(self, control: TextIO) -> None:
        """Forward until `control` ends; each of its lines sets "DELAY_MS LOSS_PERCENT"."""
        self._selector.register(control, selectors.EVENT_READ)
        while True:
            self._send_due(time.monotonic())
            wait = max(0.0, self._due[0][0] - time.monotonic()) if self._due else IDLE_WAIT_S
            for key, _ in self._selector.select(wait):
                if key.fileobj is control:
                    if not self.set_from(control.readline()):
                        return
                else:
                    self._drain(key.fileobj)  # type: ignore[arg-type]

    def set_from(self, line: str) -> bool:
        """Apply a control line; False at the end of the control stream."""
        if not line:
            return False
        delay_ms, loss_percent = (float(v) for v in line.split())
        self.delay_s, self.loss = delay_ms / 1000, loss_percent / 100
        return True

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                frame = sock.recv(MAX_FRAME)
            except BlockingIOError:
                return
            if sock is not self.impaired:
                _send(self.impaired, frame)
            elif not (self.loss and random.random() < self.loss):
                when = time.monotonic() + self.delay_s
                heapq.heappush(self._due, (when, next(self._order), frame))

    def _send_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _send(self.other, heapq.heappop(self._due)[2])


def _send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError as exc:  # a full queue or a port going down: the frame is lost, as on a wire
        print(f"netem: dropped a frame of {len(frame)} bytes: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smtpfleet.testing.netem")
    parser.add_argument("--from", dest="source", required=True, help="the impaired member's port")
    parser.add_argument("--to", dest="target", required=True, help="the bridge side")
    args = parser.parse_args(argv)
    forwarder = Forwarder(open_port(args.source), open_port(args.target), 0.0, 0.0)
    print("ready", flush=True)
    # The first line starts the forwarding, with the impairment it names.
    if forwarder.set_from(sys.stdin.readline()):
        forwarder.run(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
