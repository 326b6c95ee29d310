"""The package's import graph has no circles — counting imports inside functions too, which is
where circles hide — so lower layers (ops, instrument, longctx, organisms …) never import the
``Lab`` facade or the loader back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qwen35_lab": ROOT / "qwen35_lab", "qwen35_lab._kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module counts as the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# A package's __init__ re-exports its modules: the package importing its own children is not a
# circle of layers, so edges from a package to its submodules are left out.
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        deps = _imports(name, path, known)
        if path.name == "__init__.py":
            deps = {d for d in deps if not d.startswith(name + ".")}
        graph[name] = {d for d in deps if not name.startswith(d + ".") or modules[d].name != "__init__.py"}
    return graph


def test_the_graph_sees_lazy_imports():
    graph = _graph()
    assert "qwen35_lab.lab" in graph["qwen35_lab.loading"]  # `from .lab import Lab` inside load()
    assert "qwen35_lab.checks" in graph["qwen35_lab.instrument.trace"]


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize("low", ["qwen35_lab.checks", "qwen35_lab._io", "qwen35_lab.checkpoint_files"])
def test_the_lowest_layers_import_nothing_of_the_package(low):
    graph = _graph()
    assert graph[low] <= {"qwen35_lab.checks"}, graph[low]
