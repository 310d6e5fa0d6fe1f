"""The package's shape: imports point one way, core <- analysis <- interventions <- io, viz
<- cli, with no cycle and no import hidden in a function to dodge one.

Read from the source with ``ast`` (nothing is imported), counting imports at module level
and inside functions and classes, but not those under ``if TYPE_CHECKING:`` (never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "resid"
LAYERS = {"core": 0, "analysis": 1, "interventions": 2, "io": 3, "viz": 3, "cli": 4, "__main__": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The resid modules an import statement in ``module`` loads (``from resid.x import y``
    names the submodule ``resid.x.y`` when there is one, else ``resid.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "resid"]
    if node.level:  # relative: from the package holding this module
        package = module if is_package(module) else module.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "resid":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported resid module, inside a function?, line) for every import ``module`` runs."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend((target, in_function, node.lineno) for target in resolve(module, node))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    unknown = [t for t, _, _ in found if t not in MODULES]
    assert not unknown, f"{module} imports resid modules that do not exist: {unknown}"
    return found


GRAPH = {m: imports(m) for m in MODULES}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None  # None: resid itself


def test_the_walk_sees_the_package():
    """The walk finds the layers, their modules and the imports between them (so the tests
    below are not vacuous)."""
    assert {m.split(".")[1] for m in MODULES if "." in m} >= set(LAYERS) - {"__main__"}
    assert any(t == "resid.core.hooks" for t, _, _ in GRAPH["resid.core.model"])
    assert sum(len(v) for v in GRAPH.values()) > 50
    # the resolver itself, on statements written here
    assert resolve("resid.core.model", ast.parse("from resid.core import hooks").body[0]) == [
        "resid.core.hooks"
    ]
    assert resolve("resid.core.model", ast.parse("from .hooks import HookPoint").body[0]) == [
        "resid.core.hooks"
    ]
    assert resolve("resid.core", ast.parse("from . import model").body[0]) == ["resid.core.model"]
    assert resolve("resid.cli", ast.parse("from resid import load").body[0]) == ["resid"]
    assert resolve("resid.cli", ast.parse("import resid.io.loading").body[0]) == [
        "resid.io.loading"
    ]


def test_no_function_level_imports_of_resid():
    hidden = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}"
        for m, found in GRAPH.items()
        for target, in_function, line in found
        if in_function
    ]
    assert hidden == []


def test_layers_import_downwards_only():
    """core <- analysis <- interventions <- io, viz <- cli: a module imports only its own
    layer or lower ones (io and viz, side by side, not each other); only resid/__init__.py,
    the composition root, imports across them all, and no module imports it."""
    wrong = []
    for m, found in GRAPH.items():
        for target, _, line in found:
            if target == "resid":
                wrong.append(f"{m}:{line} imports resid itself (the composition root)")
                continue
            src, dst = layer(m), layer(target)
            if src is None:
                continue  # resid/__init__.py
            same_level_sibling = src == dst and m.split(".")[1] != target.split(".")[1]
            if dst > src or (same_level_sibling and src == LAYERS["io"]):
                wrong.append(f"{m}:{line} imports {target}")
    assert wrong == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in found if t != m} for m, found in GRAPH.items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("name", ["load", "patching", "metrics", "Model", "path_patching"])
def test_short_public_names_still_import(name):
    import resid

    assert hasattr(resid, name)
