"""engine/ and kernels/ import one another without cycles, counting every import statement (TYPE_CHECKING and
function-level ones too): in a cycle no module is the lower layer, and which one loads first decides what works."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_paths(*packages: str) -> dict[str, Path]:
    paths = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            paths[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return paths


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `path` imports (`from a.b import c` imports a.b, and a.b.c if it is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names & known.keys()


def test_engine_and_kernels_have_no_import_cycle() -> None:
    modules = module_paths("engine", "kernels")
    assert "engine.model_runner" in modules and "kernels.paged_attention" in modules
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
