"""The package's import structure: no circle among its modules, no private reach into the
module, and the engine does not import every algorithm."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pl_federated"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """pl_federated modules imported anywhere in ``tree`` (functions included), except under
    ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(ast.parse(p.read_text()), modules) - {name} for name, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_circle_in_the_package():
    graph = _graph()
    assert "pl_federated.module" in graph and graph["pl_federated.engine.round_state"] == set()
    assert _cycles(graph) == []


def test_engine_and_loops_never_import_the_module():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("pl_federated.engine", "pl_federated.loops", "pl_federated.data")):
            assert "pl_federated.module" not in deps, name


def test_no_private_member_of_the_module_is_used_outside_it():
    pattern = re.compile(r"\b(fed|pl_module)\._[a-z][A-Za-z_]*")
    for path in PACKAGE.rglob("*.py"):
        if path.name != "module.py" or path.parent != PACKAGE:
            assert not pattern.findall(path.read_text()), path


def test_importing_the_engine_does_not_import_every_algorithm():
    code = (
        "import sys, pl_federated.module; "
        "print(sorted(m for m in sys.modules if m.startswith('pl_federated.callbacks.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip()))
    assert (
        "pl_federated.callbacks.kd3a" not in loaded and "pl_federated.callbacks.fedmd" not in loaded
    )
    assert "pl_federated.callbacks.base" in loaded
