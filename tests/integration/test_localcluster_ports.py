"""The test cluster survives losing a node's port between picking it and binding it."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from smtpfleet.testing import localcluster, send
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.redis_server import LOOPBACK, free_port

pytestmark = pytest.mark.timeout(60)


async def test_a_node_whose_port_was_taken_starts_again_on_new_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first port handed out is already bound by someone else when the node starts, as
    # when another process's outgoing connection took it from the ephemeral range.
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen()
    ports: Iterator[int] = iter([taken.getsockname()[1]])
    monkeypatch.setattr(localcluster, "free_port", lambda: next(ports, None) or free_port())
    try:
        async with LocalCluster(nodes=1, sinks=1) as cluster:
            (node,) = cluster.node_processes
            assert node.smtp_port != taken.getsockname()[1]
            assert (await send(node.smtp)).code == 250
    finally:
        taken.close()
