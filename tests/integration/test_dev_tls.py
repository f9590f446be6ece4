"""`smtpfleet dev` nodes offer STARTTLS with a throwaway certificate; mail goes through it."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest

from smtpfleet.testing import LocalCluster, eventually

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

MESSAGE = b"Subject: dev tls\r\nMessage-ID: <dev-tls@test>\r\n\r\nhello\r\n"


def _send(address: tuple[str, int], context: ssl.SSLContext) -> None:
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=10) as client:
        client.starttls(context=context)
        client.sendmail("sender@example.com", ["rcpt@example.net"], MESSAGE)


async def test_dev_cluster_nodes_offer_starttls() -> None:
    async with LocalCluster(nodes=1, sinks=1) as cluster:
        assert cluster.tls is not None
        assert cluster.info()["tls_ca"] == str(cluster.tls.ca_file)
        node = cluster.node_processes[0]
        await asyncio.to_thread(_send, node.smtp, cluster.tls.client_context())
        sink = cluster.sink_servers[0]
        await eventually(lambda: len(sink.messages) == 1, timeout_s=30)
        data = sink.messages[0].data
        assert b"(using TLSv1.3 with cipher " in data
        assert b" with ESMTPS id " in data
