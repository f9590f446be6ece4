"""Delay and loss on one member's link of a `testing.netns.Fabric`.

With `sch_netem` in the kernel: `tc qdisc add dev <member's interface> root netem delay …
loss …`, inside the member's namespace (the frames it sends). Without it (some CI kernels,
and this one): the member's hub port leaves the bridge and `python -m smtpfleet.testing.netem`
forwards its frames, delayed and dropped, through a spare veth pair whose other end is on the
bridge. The forwarder opens its sockets before the port leaves the bridge and starts right
after, and is told new figures in place, so switching costs no frame.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from smtpfleet.testing.ipcmd import NetnsError, run

READY_LINE = b"ready"


@dataclass(frozen=True)
class Link:
    """Where a member's link is: its namespace and interface there, its port in the hub."""

    namespace: str
    inner: str
    port: str


@dataclass
class _Active:
    link: Link
    forwarder: subprocess.Popen[bytes] | None  # None: kernel netem
    spare: tuple[str, str] = ("", "")  # the forwarder's veth pair in the hub


@dataclass
class Impairments:
    """The impaired links of one fabric (its hub namespace and bridge)."""

    hub: str
    bridge: str
    prefix: str  # for the spare veths' names
    _active: dict[str, _Active]

    @classmethod
    def of(cls, hub: str, bridge: str, prefix: str) -> Impairments:
        return cls(hub, bridge, prefix, {})

    def set(self, link: Link, delay_ms: int, loss_percent: float) -> str:
        """Delay or lose the frames the member sends; "netem" or "forwarder" (the means)."""
        current = self._active.get(link.port)
        if current is not None and current.forwarder is not None:
            _control(current.forwarder, delay_ms, loss_percent)  # changed in place, no gap
            return "forwarder"
        netem = [*(("delay", f"{delay_ms}ms") if delay_ms else ())]
        netem += [*(("loss", f"{loss_percent:g}%") if loss_percent else ())]
        verb = "change" if current is not None else "add"
        try:
            run("ip", "netns", "exec", link.namespace, "tc", "qdisc", verb, "dev", link.inner,
                "root", "netem", *netem)  # fmt: skip
        except NetnsError as exc:
            if "unknown" not in str(exc).lower():
                raise
        else:
            self._active[link.port] = _Active(link, None)
            return "netem"
        self._active[link.port] = self._forwarder(link, delay_ms, loss_percent)
        return "forwarder"

    def _forwarder(self, link: Link, delay_ms: int, loss_percent: float) -> _Active:
        index = link.port.rpartition("p")[2]
        spare = (f"{self.prefix}f{index}", f"{self.prefix}g{index}")
        hub = self.hub
        run("ip", "-n", hub, "link", "add", spare[0], "type", "veth", "peer", "name", spare[1])
        run("ip", "-n", hub, "link", "set", spare[0], "master", self.bridge, "up")
        run("ip", "-n", hub, "link", "set", spare[1], "up")
        process = subprocess.Popen(  # noqa: S603 - our interpreter and module
            [
                *("ip", "netns", "exec", hub, sys.executable, "-m", "smtpfleet.testing.netem"),
                *("--from", link.port, "--to", spare[1]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        active = _Active(link, process, spare)
        assert process.stdout is not None
        if process.stdout.readline().strip() != READY_LINE:
            self._stop(active)
            raise NetnsError(f"the netem forwarder for {link.port} did not start")
        run("ip", "-n", hub, "link", "set", link.port, "nomaster")
        _control(process, delay_ms, loss_percent)
        return active

    def clear(self, link: Link) -> None:
        active = self._active.pop(link.port, None)
        if active is None:
            return
        if active.forwarder is None:
            run("ip", "netns", "exec", link.namespace, "tc", "qdisc", "del", "dev", link.inner,
                "root", check=False)  # fmt: skip
            return
        # Back on the bridge first, then stop the forwarder: no gap (what it still holds
        # arrives late, or twice, which TCP takes in its stride).
        run("ip", "-n", self.hub, "link", "set", link.port, "master", self.bridge, check=False)
        self._stop(active)

    def stop_all(self) -> None:
        for active in self._active.values():
            self._stop(active)
        self._active.clear()

    def _stop(self, active: _Active) -> None:
        process = active.forwarder
        if process is not None:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
        if active.spare[0]:
            run("ip", "-n", self.hub, "link", "del", active.spare[0], check=False)


def _control(forwarder: subprocess.Popen[bytes], delay_ms: int, loss_percent: float) -> None:
    assert forwarder.stdin is not None
    forwarder.stdin.write(f"{delay_ms} {loss_percent}\n".encode())
    forwarder.stdin.flush()
