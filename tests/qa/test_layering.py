"""The arrows point one way (STYLE.md): inbound never touches Redis, pure modules do no I/O,
and the node's own modules never import the tooling that ships beside them."""

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


# The node: what `smtpfleet serve` runs. None of it may import the tooling below.
TOOLING = ("smtpfleet.testing", "smtpfleet.loadgen", "smtpfleet.drills", "smtpfleet.cli")


TOOLING_DIRS = ("testing", "loadgen", "drills", "cli")


def product_files() -> list[Path]:
    """Every module of the node: all of the package but its tooling (a new module is included
    without anyone remembering to list it)."""
    return sorted(
        path
        for path in SRC.rglob("*.py")
        if path.relative_to(SRC).parts[0] not in TOOLING_DIRS and path.name != "__main__.py"
    )


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by full name (`from a import b` counts as a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


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


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_the_node_never_imports_tooling(path: Path) -> None:
    tooling = {
        name for name in imported_modules(path) for t in TOOLING if f"{name}.".startswith(f"{t}.")
    }
    assert not tooling, f"{path.relative_to(SRC)} imports {sorted(tooling)}"


def test_the_product_list_names_real_modules() -> None:
    assert all(path.is_file() for path in product_files())
    assert len(product_files()) > 30


def test_nothing_imports_the_cli() -> None:
    for path in SRC.rglob("*.py"):
        if SRC / "cli" not in path.parents and path.name != "__main__.py":
            assert "smtpfleet.cli" not in path.read_text(), path
