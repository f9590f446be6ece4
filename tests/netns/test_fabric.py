"""The namespace fabric itself: it cuts, delays and heals real traffic, and leaves nothing
behind, even when the test fails. Needs root and iproute2 (skipped elsewhere, saying why)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from smtpfleet.testing import ipcmd
from smtpfleet.testing.netns import Fabric
from smtpfleet.testing.redis_server import RedisServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.solo]


def _leftovers(run_id: str) -> str:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return "\n".join(line for line in (namespaces + links).splitlines() if f"sf{run_id}" in line)


def _ping_ms(address: str, port: int, timeout_s: float = 1.0) -> float:
    """A Redis PING round trip over a fresh connection (connect included)."""
    start = time.monotonic()
    with socket.create_connection((address, port), timeout=timeout_s) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
    return (time.monotonic() - start) * 1000


def test_cut_impair_and_heal_act_on_real_traffic() -> None:
    with Fabric() as fabric:
        member = fabric.add_member("redis")
        with RedisServer(
            host=member.address,
            port=6379,
            wrapper=fabric.exec_prefix(member),
            extra_args=("--protected-mode", "no"),
        ):
            assert _ping_ms(member.address, 6379) < 100
            cut = fabric.cut(fabric.host_address, member.address)
            with pytest.raises(TimeoutError):
                _ping_ms(member.address, 6379, timeout_s=0.5)
            fabric.heal(cut)
            assert _ping_ms(member.address, 6379) < 100
            fabric.impair(member, delay_ms=200)
            # Two of Redis's frames are delayed: the SYN-ACK and the PONG.
            assert 400 <= _ping_ms(member.address, 6379) < 1000
            fabric.unimpair(member)
            assert _ping_ms(member.address, 6379) < 100


def _fail_inside(fabric: Fabric, started: list[subprocess.Popen[bytes]]) -> None:
    with fabric:
        member = fabric.add_member("node1")
        started.append(subprocess.Popen([*fabric.exec_prefix(member), "sleep", "60"]))
        fabric.impair(member, loss_percent=5)
        assert _leftovers(fabric.run_id)
        raise RuntimeError("boom")


def test_everything_is_removed_even_when_the_test_fails() -> None:
    fabric = Fabric()
    started: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="boom"):
        _fail_inside(fabric, started)
    assert started[0].wait(timeout=5) != 0  # killed with its namespace
    assert _leftovers(fabric.run_id) == ""


def test_what_a_killed_run_left_is_swept_by_the_next() -> None:
    # A run killed with SIGKILL: its mark names a process that is gone, its namespace remains.
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_id = "dead01"
    subprocess.run(["ip", "netns", "add", f"sf{run_id}-hub"], check=True)
    ipcmd.OWNERS_DIR.mkdir(mode=0o700, exist_ok=True)
    (ipcmd.OWNERS_DIR / run_id).write_text(str(dead.pid))
    assert _leftovers(run_id)
    assert run_id in ipcmd.sweep_stale()
    assert _leftovers(run_id) == ""
    assert not (ipcmd.OWNERS_DIR / run_id).exists()
