"""Helpers for tests and drills, shipped with the package so users can reuse them.

Almost everything here is real: a real Redis server process, real SMTP servers (aiosmtpd
sinks) on loopback port 0, nodes in-process or as separate processes, a real SMTP client and a
real DNS server. The exception is `memory`: in-memory doubles of the queue, the cluster store
and the relays, for unit tests of the rules around them. Nothing in the node imports this
package (tests/qa checks that).

The names below load their module on first use, so `import smtpfleet.testing.sink` (or the
benchmark's `python -m smtpfleet.testing.sink`) does not start a node's worth of imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smtpfleet.testing.client import Reply, eventually, make_message, run_cli, send
    from smtpfleet.testing.dns_server import DnsServer
    from smtpfleet.testing.faultproxy import FaultProxy
    from smtpfleet.testing.inbound import Front, MemorySpool, inbound_front
    from smtpfleet.testing.localcluster import LocalCluster, NodeProcess
    from smtpfleet.testing.memory import Clock, MemoryClusterStore, MemoryQueue, ScriptedRelays
    from smtpfleet.testing.netns import Fabric
    from smtpfleet.testing.netns_cluster import NetnsCluster
    from smtpfleet.testing.nodes import FAST_RETRY, node_config, running_node
    from smtpfleet.testing.redis_server import RedisServer, free_port
    from smtpfleet.testing.routing import domain_routed_first_to, ring_order
    from smtpfleet.testing.sink import Faults, ReceivedMessage, Sink
    from smtpfleet.testing.steady import SteadyLoad, message_ids, queue_is_empty, whereabouts
    from smtpfleet.testing.tls import TlsFiles, make_tls_files

_HOMES = {
    "client": ("Reply", "eventually", "make_message", "run_cli", "send"),
    "dns_server": ("DnsServer",),
    "faultproxy": ("FaultProxy",),
    "inbound": ("Front", "MemorySpool", "inbound_front"),
    "localcluster": ("LocalCluster", "NodeProcess"),
    "memory": ("Clock", "MemoryClusterStore", "MemoryQueue", "ScriptedRelays"),
    "netns": ("Fabric",),
    "netns_cluster": ("NetnsCluster",),
    "nodes": ("FAST_RETRY", "node_config", "running_node"),
    "redis_server": ("RedisServer", "free_port"),
    "routing": ("domain_routed_first_to", "ring_order"),
    "sink": ("Faults", "ReceivedMessage", "Sink"),
    "steady": ("SteadyLoad", "message_ids", "queue_is_empty", "whereabouts"),
    "tls": ("TlsFiles", "make_tls_files"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "FAST_RETRY",
    "Clock",
    "DnsServer",
    "Fabric",
    "FaultProxy",
    "Faults",
    "Front",
    "LocalCluster",
    "MemoryClusterStore",
    "MemoryQueue",
    "MemorySpool",
    "NetnsCluster",
    "NodeProcess",
    "ReceivedMessage",
    "RedisServer",
    "Reply",
    "ScriptedRelays",
    "Sink",
    "SteadyLoad",
    "TlsFiles",
    "domain_routed_first_to",
    "eventually",
    "free_port",
    "inbound_front",
    "make_message",
    "make_tls_files",
    "message_ids",
    "node_config",
    "queue_is_empty",
    "ring_order",
    "run_cli",
    "running_node",
    "send",
    "whereabouts",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
