"""The arrows point one way (STYLE.md): inbound never touches Redis, pure modules do no I/O,
and the node's own modules never import the tooling that ships beside them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from sources import parse

SRC = Path(__file__).parents[2] / "src" / "smtpfleet"
IO_MODULES = {"redis", "aiosmtplib", "aiosmtpd", "socket", "asyncio", "subprocess"}
PURE = [
    "config.py",
    "envelope.py",
    "replies.py",
    "inbound/policy.py",
    "inbound/dkim.py",
    "inbound/limits.py",
    "delivery/backoff.py",
    "delivery/dsn.py",
    "delivery/outcome.py",
    "relays/ring.py",
    "relays/rules.py",
    "health/state.py",
    "queue/keys.py",
    "queue/suitability.py",
    "cluster/liveness.py",
    "cluster/drift.py",
    "queue/topology.py",
    "queue/classes.py",
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
    for node in ast.walk(parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(parse(path.read_text())):
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


# The layer order, lowest first. A module imports modules of its own layer or below, never
# above; and an I/O implementation never imports another package's I/O implementation (they
# meet in node.py, which wires them). A product module listed nowhere is an I/O module.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundations": (
        "config", "config_env", "config_tls", "config_values", "config_yaml", "envelope",
        "replies", "errors", "logs", "metrics", "queue.keys", "queue.scripts", "tasks",
        "deadlines",
    ),
    "decisions": (
        "delivery.classify", "delivery.backoff", "delivery.dsn", "delivery.outcome",
        "relays.ring", "relays.rules", "health.state", "cluster.liveness", "cluster.drift",
        "inbound.policy", "inbound.syntax", "inbound.budget", "inbound.dkim", "inbound.limits",
        "queue.suitability", "queue.topology", "queue.classes", "queue.late_writes",
        "relays.mail_params",
    ),
    "protocols": (
        "queue.spool", "queue.deliveries", "cluster.store", "relays.clients", "inbound.failures",
        "inbound.counters",
    ),
    "io": (),  # everything else of the product
    "node": ("node", "lifecycle", "supervisor"),
    "tooling": ("testing", "loadgen", "drills"),
    "cli": ("cli",),
}  # fmt: skip
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    for layer, members in LAYERS.items():
        if any(module == m or module.startswith(f"{m}.") for m in members):
            return layer
    return "io"


def package_of(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


def import_graph() -> dict[str, set[str]]:
    """Module -> the smtpfleet modules it imports (names relative to the package)."""
    paths = [p for p in SRC.rglob("*.py") if p.name != "__main__.py" and p != SRC / "__init__.py"]
    modules = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        found = set()
        for name in imported_modules(path):
            short = name.removeprefix("smtpfleet.")
            if name.startswith("smtpfleet.") and short in modules:
                found.add(short)
        # `from smtpfleet.queue import keys` names the package and the module: keep the module.
        packages = {m for m in found if any(o.startswith(f"{m}.") for o in found)}
        graph[module_name(path)] = found - packages
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imports in sorted(graph.items()):
        mine = ORDER.index(layer_of(module))
        for imported in sorted(imports):
            theirs = ORDER.index(layer_of(imported))
            if theirs > mine:
                found.append(f"{module} ({ORDER[mine]}) imports {imported} ({ORDER[theirs]})")
            elif mine == theirs == ORDER.index("io") and package_of(module) != package_of(imported):
                found.append(f"{module} imports {imported}: I/O of another package (wire in node)")
    return found


def test_imports_follow_the_layer_order() -> None:
    assert violations(import_graph()) == []


def test_every_listed_module_exists() -> None:
    graph = import_graph()
    for members in LAYERS.values():
        for member in members:
            assert any(m == member or m.startswith(f"{member}.") for m in graph), member


@pytest.mark.parametrize(
    ("module", "planted", "complaint"),
    [
        (
            "delivery.outcome",
            "queue.deliveries",
            "(decisions) imports queue.deliveries (protocols)",
        ),
        ("config", "metrics", ""),  # same layer: allowed
        ("health.checker", "queue.redis_cluster", "I/O of another package"),
        ("cluster.store", "queue.redis_queue", "(protocols) imports queue.redis_queue (io)"),
        ("queue.redis_admin", "node", "(io) imports node (node)"),
    ],
)
def test_the_layer_check_catches_a_planted_violation(
    module: str, planted: str, complaint: str
) -> None:
    graph = import_graph()
    graph[module] = graph[module] | {planted}
    found = violations(graph)
    if complaint:
        assert any(complaint in v for v in found), found
    else:
        assert found == []
