"""The qemusnap package has no import circle (SPEC layering: pure core, adapters, engine rooms,
then the facade and what embeds it).  Every relative import of every module counts, wherever it
stands (a function-local import still closes a circle at run time)."""

from __future__ import annotations

import ast
from pathlib import Path

import qemusnap

PACKAGE = Path(qemusnap.__file__).parent


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative imports, resolved)."""
    modules = {_module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if _is_package(name, modules) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                # ``from . import agent`` imports the module qemusnap.agent; ``from .x import y``
                # imports module x (and y, if y is itself a module of package x).
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    graph[name].add(sub)
                    if not node.module:
                        continue
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_sees_a_circle() -> None:
    """The check can fail: a circle through three modules is found, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import thing\n")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from .thing import Y\n")
    (pkg / "sub" / "thing.py").write_text(
        "from .. import low\nfrom ..low import X\n\ndef f():\n    from . import other\n"
    )
    (pkg / "sub" / "other.py").write_text("from .thing import Y\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.thing"] == {"pkg.low", "pkg.sub.other"}
    assert graph["pkg"] == {"pkg.sub", "pkg.sub.thing"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.sub.other", "pkg.sub.thing"}


def test_qemusnap_has_no_import_circle() -> None:
    graph = import_graph()
    assert "qemusnap.engine.vm" in graph and "qemusnap.harness" in graph
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"
