"""The arrows point one way (STYLE.md): inbound never touches Redis, pure modules do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "smtpfleet"
IO_MODULES = {"redis", "aiosmtplib", "aiosmtpd", "socket", "asyncio", "subprocess"}
PURE = [
    "config.py",
    "envelope.py",
    "replies.py",
    "inbound/policy.py",
    "delivery/backoff.py",
    "delivery/dsn.py",
    "delivery/outcome.py",
    "relays/ring.py",
    "health/state.py",
    "queue/keys.py",
]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
            if node.module.startswith("smtpfleet.queue.redis"):
                roots.add("smtpfleet.queue.redis")
    return roots


@pytest.mark.parametrize("path", sorted((SRC / "inbound").glob("*.py")), ids=lambda p: p.name)
def test_inbound_never_imports_redis(path: Path) -> None:
    roots = imported_roots(path)
    assert "redis" not in roots
    assert "smtpfleet.queue.redis" not in roots


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_do_no_io(name: str) -> None:
    assert not imported_roots(SRC / name) & IO_MODULES


def test_nothing_imports_the_cli() -> None:
    for path in SRC.rglob("*.py"):
        if path.name not in {"cli.py", "__main__.py"}:
            assert "smtpfleet.cli" not in path.read_text(), path
