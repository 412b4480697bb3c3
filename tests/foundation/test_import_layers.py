"""Imports only go down the layers of docs/architecture.md, and no modules import each other in a circle.

Every ``import`` / ``from ... import`` in ``joyai_megatron/`` counts, those inside functions too (a
lazy import is still a dependency).  A package missing from ``LAYERS`` fails as well: a new package
gets its place in the table (and in docs/architecture.md) when it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.joyai_helpers import REPO

PACKAGE = REPO / "joyai_megatron"

# Lowest first.  A module may import its own package and any package of a lower layer, nothing else.
LAYERS: list[set[str]] = [
    {"known_warnings"},
    {"errors", "checksums"},
    {"config"},
    {"optim"},
    {"compat"},
    {"model"},
    {"training"},
    {"convert"},
    {"quant", "rl"},
    {"stages"},
    {"evaluation"},
    {"smoke", "demo"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The ``joyai_megatron`` modules ``path`` imports (the longest module prefix of each name)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def layer_of(module: str) -> str:
    """``joyai_megatron.training.trainer`` -> ``training``; the root package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        a = layer_of(src)
        for dst in sorted(targets):
            b = layer_of(dst)
            if "" in (a, b) or a == b:
                continue  # the root package's docstring-only __init__, or within one package
            if a not in LAYER or b not in LAYER:
                bad.append(f"{src} -> {dst}: {a if a not in LAYER else b} has no layer in LAYERS")
            elif LAYER[b] >= LAYER[a]:
                bad.append(f"{src} ({a}, layer {LAYER[a]}) -> {dst} ({b}, layer {LAYER[b]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            # a module importing its own package's __init__ is how Python loads it, not a circle
            if v.startswith(w + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer() -> None:
    packages = {
        p.name if p.is_dir() else p.stem
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert packages - {"__init__"} <= set(LAYER), sorted(packages - {"__init__"} - set(LAYER))


def test_imports_only_go_down_the_layers() -> None:
    bad = upward_edges(import_graph())
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "modules importing each other in a circle:\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize(
    ("graph", "upward", "circular"),
    [
        ({"joyai_megatron.model.count": {"joyai_megatron.training.distributed"}}, 1, 0),
        ({"joyai_megatron.training.trainer": {"joyai_megatron.model.build"}}, 0, 0),
        (
            {
                "joyai_megatron.quant.a": {"joyai_megatron.quant.b"},
                "joyai_megatron.quant.b": {"joyai_megatron.quant.a"},
            },
            0,
            1,
        ),
        ({"joyai_megatron.quant.x": {"joyai_megatron.rl.y"}}, 1, 0),  # one layer, two packages: no edges
    ],
)
def test_the_checks_catch_what_they_should(graph: dict[str, set[str]], upward: int, circular: int) -> None:
    """The checks themselves, on small graphs: an upward edge, a downward one, a circle."""
    assert len(upward_edges(graph)) == upward
    assert len(cycles(graph)) == circular


def test_stages_extend_the_trainer_only_through_stage_hooks() -> None:
    """One way to extend a stage: `Stage` hooks. A `Trainer` subclass overriding private methods
    (how RL and QAT used to plug in) would be a second way."""
    subclasses = []
    for path in (REPO / "joyai_megatron").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", None)) for b in node.bases}
                if "Trainer" in bases:
                    subclasses.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not subclasses, subclasses
