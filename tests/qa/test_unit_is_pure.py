"""tests/unit is pure logic: plain values in, plain values out. A test that opens a socket,
starts a server or a process belongs in tests/integration, where the real-server fixtures are."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from sources import parse

UNIT = Path(__file__).parents[1] / "unit"

# Names that mean a real socket, server or process (the helpers of smtpfleet.testing, asyncio's
# and the standard library's network and process calls).
REAL_THINGS = {
    "open_connection",
    "start_server",
    "create_server",
    "create_connection",
    "open_unix_connection",
    "start_unix_server",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "subprocess",
    "socket",
    "RedisServer",
    "Sink",
    "LocalCluster",
    "NodeProcess",
    "DnsServer",
    "FaultProxy",
    "SteadyLoad",
    "running_node",
    "free_port",
    "InboundServer",
}
# Too common as a double's method or class name to match anywhere: only an import counts.
REAL_IMPORTS = REAL_THINGS | {"send", "run_cli", "Node"}
# The conftest fixtures that start a real Redis or a real relay.
REAL_FIXTURES = {"redis_server", "redis_url", "redis_client", "sink", "sink_b"}


def unit_files() -> list[Path]:
    return sorted(UNIT.glob("*.py"))


def _imported(node: ast.Import | ast.ImportFrom) -> set[str]:
    names = {alias.name for alias in node.names}
    modules = (
        {alias.name.split(".")[0] for alias in node.names}
        if isinstance(node, ast.Import)
        else set()
    )
    if isinstance(node, ast.ImportFrom) and node.module:
        modules.add(node.module.split(".")[0])
    return {n.rpartition(".")[2] for n in names} | modules


def real_things_used(source: str) -> set[str]:
    """Every real-server name a test module imports, calls, or asks for as a fixture."""
    found: set[str] = set()
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= _imported(node) & REAL_IMPORTS
        elif isinstance(node, ast.Attribute) and node.attr in REAL_THINGS:
            found.add(node.attr)
        elif isinstance(node, ast.Name) and node.id in REAL_THINGS:
            found.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found |= {a.arg for a in node.args.args} & REAL_FIXTURES
    return found


@pytest.mark.parametrize("path", unit_files(), ids=lambda p: p.name)
def test_unit_tests_start_no_servers_or_processes(path: Path) -> None:
    used = real_things_used(path.read_text())
    assert not used, f"{path.name} uses {sorted(used)}: move it to tests/integration"


def test_the_check_sees_real_servers() -> None:
    # Positive control: the check must recognise each way a real thing gets in.
    samples = {
        "import asyncio\nasync def t():\n    await asyncio.open_connection('127.0.0.1', 1)\n": {
            "open_connection"
        },
        "from smtpfleet.testing import Sink, running_node\n": {"Sink", "running_node"},
        "from smtpfleet.testing.client import send\n": {"send"},
        "class Fake:\n    def go(self):\n        return self.send()\n": set(),
        "import subprocess\n": {"subprocess"},
        "def test_x(redis_url: str) -> None:\n    pass\n": {"redis_url"},
        "async def test_x(sink):\n    pass\n": {"sink"},
    }
    for source, expected in samples.items():
        assert real_things_used(source) == expected, source
    assert unit_files(), "no unit tests found: the check would pass vacuously"
