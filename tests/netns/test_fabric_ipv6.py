"""The fabric on IPv6 (fd5f:<run id>::/64): real TCP over it, a cut that takes IPv6 too (a
filter on `protocol ip` alone lets every IPv6 packet through), the heal, and the cut as a
command (`python -m smtpfleet.testing.netcut`, what a target file's commands call).
Needs root and iproute2 (skipped elsewhere, saying why)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time

import pytest

from smtpfleet.testing.netns import Fabric
from smtpfleet.testing.redis_server import RedisServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.solo]

PORT = 6379


def _pong(address: str, timeout_s: float = 1.0) -> bool:
    """A Redis PING over a fresh connection: True on PONG, False when nothing came back."""
    try:
        with socket.create_connection((address, PORT), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64) == b"+PONG\r\n"
    except TimeoutError:
        return False


def _netcut(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "smtpfleet.testing.netcut", *args], check=True)


def test_a_cut_on_an_ipv6_fabric_drops_ipv6_and_ipv4_and_heals() -> None:
    with Fabric(ipv6=True) as fabric:
        member = fabric.add_member("redis")
        assert ipaddress.ip_address(member.address).version == 6
        assert ipaddress.ip_address(fabric.host_address) in fabric.subnet6
        four = fabric.twins[member.address]
        with RedisServer(
            host=member.address,
            port=PORT,
            wrapper=fabric.exec_prefix(member),
            # Both families: the cut must take each of them.
            extra_args=("--protected-mode", "no", "--bind", member.address, four),
        ):
            assert _pong(member.address)
            assert _pong(four)
            cut = fabric.cut(fabric.host_address, member.address)
            assert not _pong(member.address, timeout_s=0.5)
            assert not _pong(four, timeout_s=0.5)  # the IPv4 twins are cut along
            fabric.heal(cut)
            start = time.monotonic()
            assert _pong(member.address)
            assert _pong(four)
            assert time.monotonic() - start < 1.0


def test_the_cut_command_takes_ipv6_between_two_addresses_and_heals() -> None:
    with Fabric(ipv6=True) as fabric:
        member = fabric.add_member("redis")
        with RedisServer(
            host=member.address,
            port=PORT,
            wrapper=fabric.exec_prefix(member),
            extra_args=("--protected-mode", "no"),
        ):
            assert _pong(member.address)
            _netcut("cut", fabric.hub, fabric.host_address, member.address)
            assert not _pong(member.address, timeout_s=0.5)
            _netcut("heal", fabric.hub, fabric.host_address, member.address)
            assert _pong(member.address)
