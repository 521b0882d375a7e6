"""No import cycles in athwe/: every import (function-level ones included) points down the layers."""
from __future__ import annotations

import ast
from pathlib import Path

import athwe

ROOT = Path(athwe.__file__).resolve().parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The athwe modules a file imports anywhere in its body (relative imports resolved)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found - {name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, modules, root) for p in files}


def unit(module: str) -> str:
    """A module's subpackage or top-level module: athwe.models.sasrec -> athwe.models."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between subpackages (athwe.models, athwe.training, ...) and top-level modules. The root
    package's own __init__ is left out: importing any submodule runs it, so it may import nothing."""
    out: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        if src == "athwe":
            continue
        out.setdefault(unit(src), set()).update(unit(d) for d in dsts if unit(d) != unit(src) and d != "athwe")
    return out


def test_root_package_imports_nothing_of_its_own():
    assert import_graph()["athwe"] == set()


def test_no_module_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_subpackages():
    cycle = find_cycle(unit_graph(import_graph()))
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle or [])


def test_the_checker_finds_cycles(tmp_path):
    """The same reader on a tiny package with a function-level import that closes a cycle."""
    pkg = tmp_path / "athwe"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def validate():\n    from athwe.models import registry\n")
    (pkg / "models" / "__init__.py").write_text("from . import registry\n")
    (pkg / "models" / "registry.py").write_text("from athwe.config import validate\n")
    graph = import_graph(pkg)
    assert graph["athwe.models.registry"] == {"athwe.config"}
    assert find_cycle(graph) == ["athwe.config", "athwe.models.registry", "athwe.config"]
    assert find_cycle(unit_graph(graph)) == ["athwe.config", "athwe.models", "athwe.config"]
