"""The import graph of ``taft`` runs one way and has no circle.

Layers, lowest first: engine → rules (and kernels) → families (models) → core (scopes, TangentModel, Δw algebra,
checkpoints, config, data, zoo) → train → privacy / arithmetic → shards → cli. A module may import its own layer or
a lower one, never a higher one; every import counts, at module level or inside a function (a lazy import is still
a dependency). ``taft/__init__.py`` (the public API) and ``taft/__main__.py`` sit above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

RANK = {
    "_version": 0, "errors": 0, "console": 0,
    "engine": 1,
    "kernels": 2, "rules": 2,
    "models": 3,
    "scope": 4, "tangent_model": 4, "functional": 4, "delta": 4, "checkpoint": 4, "config": 4, "data": 4, "zoo": 4,
    "check": 4,
    "train": 5,
    "privacy": 6, "arithmetic": 6,
    "shards": 7,
    "cli": 8,
    "__main__": 9, "": 9,  # "": taft/__init__.py
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "taft").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Every taft module ``path`` imports (``from taft import delta`` is the module ``taft.delta``), skipping
    ``if TYPE_CHECKING:`` blocks (annotations only)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("taft"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in mods else node.module)
    return {m for m in found if m in mods}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def test_every_component_has_a_layer():
    assert {_component(m) for m in _graph()} <= set(RANK), {_component(m) for m in _graph()} - set(RANK)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if RANK[_component(t)] > RANK[_component(m)])


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """Import circles among plain modules (a package's ``__init__`` re-exporting its submodules is not one)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                found.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return [c for c in found if not any(_is_package(x) for x in c.split(" -> "))]


def _is_package(module: str) -> bool:
    return (SRC / Path(*module.split(".")) / "__init__.py").is_file()


def test_no_upward_import():
    upward = _upward(_graph())
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_circle():
    circles = _circles(_graph())
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checks_can_fail():
    """An upward import and a circle are caught; the graph sees lazy imports and ``from taft import module``."""
    assert _upward({"taft.train.loop": {"taft.shards.ops"}}) == ["taft.train.loop -> taft.shards.ops"]
    assert _circles({"taft.engine.a": {"taft.engine.b"}, "taft.engine.b": {"taft.engine.a"}}) == [
        "taft.engine.a -> taft.engine.b -> taft.engine.a"]
    graph = _graph()
    assert "taft.delta" in graph["taft.arithmetic.suite"]  # from taft import delta as D
    assert "taft.train.evaluate" in graph["taft.train.search"]  # imported inside a function
