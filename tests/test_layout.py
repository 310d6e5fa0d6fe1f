"""The package's shape: imports point one way, core <- analysis <- interventions <- sae,
harvest <- io, viz <- cli, with no cycle and no import hidden in a function to dodge one;
no module over 600 lines; nothing rebinds a class attribute or a ``sys.modules`` entry at
import; and the core imports neither plotly nor ``transformers``.

Read from the source with ``ast`` (nothing is imported), counting imports at module level
and inside functions and classes, but not those under ``if TYPE_CHECKING:`` (never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "resid"
# siblings share a level and do not import each other (sae and harvest; io and viz)
LAYERS = {
    "core": 0,
    "analysis": 1,
    "interventions": 2,
    "sae": 3,
    "harvest": 3,
    "graphs": 3.5,  # attribution graphs: on core, analysis, interventions and sae
    "io": 4,
    "viz": 4,
    "cli_train": 4.5,  # resid train-sae's options and run, under the command line that runs it
    "cli": 5,
    "__main__": 6,  # `python -m resid`: runs the command line
}
MAX_LINES = 600


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


def imports(module: str, type_only: bool = False) -> list[tuple[str, bool, int]]:
    """(imported resid module, inside a function?, line) for every import ``module`` runs
    (with ``type_only``, also those under ``if TYPE_CHECKING:``, which type checkers read)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test) and not type_only:
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


def is_shim(module: str) -> bool:
    """A top-level module outside the layers (``resid/patching.py``): the flat layout's
    names, re-exported or forwarded with a DeprecationWarning, for users only."""
    parts = module.split(".")
    return len(parts) == 2 and parts[1] not in LAYERS


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


def test_every_package_has_a_layer():
    """A new package (a folder under resid/) is placed in LAYERS, so the checks below see
    it; a top-level file outside LAYERS is a compatibility module (``is_shim``)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - set(LAYERS) == set()


def test_no_function_level_imports_of_resid():
    """Except in the command line: the top layer, which nothing imports (so its imports
    cannot hide a cycle), imports each command's layers inside that command, so that
    `resid --help` loads no torch (tests/test_cli.py times it). The direction of those
    imports is still checked below."""
    hidden = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}"
        for m, found in GRAPH.items()
        for target, in_function, line in found
        if in_function and m != "resid.cli"
    ]
    assert hidden == []
    assert any(in_function for _, in_function, _ in GRAPH["resid.cli"])  # the exemption is used


def test_layers_import_downwards_only():
    """core <- analysis <- interventions <- sae, harvest <- io, viz <- cli: a module imports
    only its own layer or lower ones (siblings, side by side, not each other); only
    resid/__init__.py, the composition root, and the flat layout's compatibility modules
    import across them all, and no layered module imports those."""
    wrong = []
    for m, found in GRAPH.items():
        for target, _, line in found:
            if target == "resid":
                wrong.append(f"{m}:{line} imports resid itself (the composition root)")
                continue
            if m == "resid" or is_shim(m):
                continue  # the composition root and the compatibility modules
            if is_shim(target):
                wrong.append(f"{m}:{line} imports the compatibility module {target}")
                continue
            src, dst = layer(m), layer(target)
            same_level_sibling = src == dst and m.split(".")[1] != target.split(".")[1]
            if dst > src or same_level_sibling:
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


def test_no_import_cycle_even_for_type_checkers():
    """Imports under ``if TYPE_CHECKING:`` count too: the core's parts name what they need
    of a model or a cache as protocols (``resid.core.protocols``) instead of importing the
    model that imports them."""
    typed = {m: imports(m, type_only=True) for m in MODULES}
    graph = {m: {t for t, _, _ in found if t != m} for m, found in typed.items()}
    assert find_cycle(graph) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


@pytest.mark.parametrize("name", ["load", "patching", "metrics", "Model", "path_patching"])
def test_short_public_names_still_import(name):
    import resid

    assert hasattr(resid, name)


def test_no_module_over_the_line_limit():
    long = {
        str(p.relative_to(ROOT.parent)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def patches_at_import(tree: ast.Module) -> list[tuple[int, str]]:
    """Statements run at import (module level, ``if``/``for``/``with``/``try`` bodies
    included; not function or class bodies) that write ``sys.modules`` or an attribute of
    another object (``Model.cache_type = ...``, ``setattr(...)``)."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, (ast.Attribute, ast.Subscript)):
                        found.append((node.lineno, ast.unparse(t)))
                        break
        if isinstance(node, ast.Call):
            f = ast.unparse(node.func)
            if f in ("setattr", "sys.modules.setdefault", "sys.modules.update") or f.endswith(
                "modules.__setitem__"
            ):
                found.append((node.lineno, f))
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in tree.body:
        visit(stmt)
    return found


def test_the_patch_finder_finds_patches():
    src = """
import sys
Model.cache_type = AnalysisCache
sys.modules["resid.x"] = x
for m in mods:
    sys.modules.setdefault(m.__name__, m)
setattr(Model, "f", g)
def f():
    obj.x = 1
class C:
    y = 2
TABLE = {}
TABLE["a"] = 1
"""
    lines = [line for line, _ in patches_at_import(ast.parse(src))]
    assert lines == [3, 4, 6, 7, 13]


def test_nothing_is_patched_at_import():
    """No ``sys.modules`` entry is written and no class or module attribute rebound at
    import: every module a user imports is a real file, and every class is as defined.
    (Filling or configuring an object the same module made, ``TABLE[k] = v`` after
    ``TABLE = {}``, is allowed.)"""
    patched = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        own = {
            t.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        for line, what in patches_at_import(tree):
            if what.split("[")[0].split(".")[0] in own and not what.startswith("setattr"):
                continue  # an object this module made
            patched.append(f"{path.relative_to(ROOT.parent)}:{line} {what}")
    assert patched == []


def test_core_imports_neither_plotly_nor_transformers():
    """Importing the core (which runs resid/__init__.py first) loads no plotting library
    and no reference implementation: they are extras."""
    code = (
        "import sys, resid.core, resid.core.model; "
        "print(sorted(m for m in ('plotly', 'transformers', 'transformer_lens') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
