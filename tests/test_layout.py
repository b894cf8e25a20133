"""The core's imports run one way: no module of onnxopt/ reaches itself again through its imports.

Every import counts, lazy ones inside functions and ``TYPE_CHECKING`` ones too: a circle through a lazy
import still ties the modules together, and is only waiting for someone to move the import up.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "onnxopt"


def _module(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n in modules} or ({node.module} & modules)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & modules
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in CORE.rglob("*.py")}
    # a package's __init__ re-exports (onnxopt/__init__ imports everything): edges into packages are not edges
    # into their contents, so only module-to-module edges are followed
    return {m: {d for d in _imports(p, set(files)) if d != m and not files[d].name == "__init__.py"}
            for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circles_in_the_core() -> None:
    assert _cycles(_graph()) == []


def test_metrics_import_only_leaves_of_onnxopt() -> None:
    """The hook specs and validation both import metrics: metrics must sit below both, so what it imports of
    onnxopt (the detection matching it scores with) imports nothing of onnxopt itself."""
    graph = _graph()
    assert graph["onnxopt.metrics"] <= {"onnxopt.detection"}
    assert all(graph[module] == set() for module in graph["onnxopt.metrics"])


def test_the_check_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
