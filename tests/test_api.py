"""The public API is a promise: every name the README, ``__all__`` or the previous layouts
made public imports from every place it was documented, as the very object that lives
in its new home; a moved name warns (``DeprecationWarning``) and says where it lives now;
every module the README names is a real file."""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch

import resid

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# the README's import paths: real files that re-export their layer's module, no warning
DOCUMENTED = {
    "resid.patching": "resid.interventions.patching",
    "resid.metrics": "resid.interventions.metrics",
    "resid.path_patching": "resid.interventions.path_patching",
    "resid.detectors": "resid.analysis.detectors",
    "resid.circuits": "resid.analysis.circuits",
    "resid.stream": "resid.core.stream",
    "resid.generation": "resid.core.generation",
    "resid.decompose": "resid.core.decompose",
    "resid.plots": "resid.viz.plots",
    "resid.attention_pages": "resid.viz.attention_pages",
}
# the flat layout's other module names (sys.modules aliases before): files now, each name
# forwarded with a DeprecationWarning naming its new place
DEPRECATED = {
    "resid.cache": "resid.core.cache",
    "resid.config": "resid.core.config",
    "resid.factored": "resid.core.factored",
    "resid.functional": "resid.core.functional",
    "resid.head": "resid.core.head",
    "resid.hooks": "resid.core.hooks",
    "resid.kv_cache": "resid.core.kv_cache",
    "resid.labelled": "resid.core.labelled",
    "resid.layers": "resid.core.layers",
    "resid.names": "resid.core.names",
    "resid.neuron": "resid.core.neuron",
    "resid.tokenizer": "resid.core.tokenizer",
    "resid.lens": "resid.core.lens",
    "resid.engine": "resid.interventions.engine",
    "resid.suffix": "resid.interventions.engine",
    "resid.loading": "resid.io.loading",
    "resid.references": "resid.io.references",
    "resid.model": "resid.core.model",
    "resid.compare": "resid.io.compare",
    "resid.analysis.decompose": "resid.core.decompose",
    "resid.analysis.lens": "resid.core.lens",
}
# names that broke when the package was layered, with where they live now (issue 19)
MOVED = {
    ("resid.compare", "random_hf_gpt2"): ("resid.io.references", "random_hf_gpt2"),
    ("resid.compare", "hf_tokenizer"): ("resid.io.references", "hf_tokenizer"),
    ("resid.model", "LayerNorm"): ("resid.core.layers", "LayerNorm"),
    ("resid.model", "Attention"): ("resid.core.layers", "Attention"),
    ("resid.model", "MLP"): ("resid.core.layers", "MLP"),
    ("resid.model", "affine"): ("resid.core.layers", "affine"),
    ("resid.model", "Config"): ("resid.core.config", "Config"),
    ("resid.stream", "Site"): ("resid.core.names", "Site"),
    ("resid.stream", "locate"): ("resid.core.names", "locate"),
    ("resid", "Components"): ("resid.core.labelled", "Labelled"),
    ("resid.decompose", "Components"): ("resid.core.labelled", "Labelled"),
    ("resid", "AnalysisCache"): ("resid.core.cache", "ActivationCache"),
    ("resid.analysis.cache", "AnalysisCache"): ("resid.core.cache", "ActivationCache"),
}


def import_name(module: str, name: str) -> tuple[object, list[warnings.WarningMessage]]:
    """``from module import name``, and the DeprecationWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = getattr(importlib.import_module(module), name)
    return obj, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def readme_imports() -> list[tuple[str, str]]:
    """Every ``from resid... import name`` and every ``resid.a.b`` attribute the README's
    Python code uses, as (module, name)."""
    found = set()
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resid"):
                found.update((node.module, a.name) for a in node.names)
            elif isinstance(node, ast.Attribute):
                chain, cur = [node.attr], node.value
                while isinstance(cur, ast.Attribute):
                    chain.append(cur.attr)
                    cur = cur.value
                if isinstance(cur, ast.Name) and cur.id == "resid":
                    chain = ["resid", *reversed(chain)]
                    found.add((".".join(chain[:-1]), chain[-1]))
    return sorted(found)


def test_the_readme_walk_finds_the_readme_s_imports():
    got = readme_imports()
    assert ("resid.patching", "sweep") in got and ("resid", "load") in got
    assert len(got) > 20


def resolve(dotted: str) -> object:
    """The object a dotted path names: the longest prefix that is a module, then
    attributes (``resid.Model.run_with_cache``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize(
    "module,name", readme_imports(), ids=[".".join(x) for x in readme_imports()]
)
def test_every_readme_name_imports_without_warning(module, name):
    """The README's code imports only what exists, without a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hasattr(resolve(module), name)
    caught = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert caught == []


def test_every_module_the_readme_names_is_a_file():
    mods = {m for m, _ in readme_imports()} | set(
        re.findall(r"\bfrom (resid(?:\.\w+)+) import", README)
    )
    for mod in sorted(mods):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError:
            continue  # an attribute chain (resid.Model.something), not a module
        path = ROOT.joinpath(*mod.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), mod
        assert Path(m.__file__).resolve() in {
            path.with_suffix(".py").resolve(),
            (path / "__init__.py").resolve(),
        }, f"{mod} is served by {m.__file__}, not its own file"


@pytest.mark.parametrize("name", resid.__all__)
def test_top_level_names(name):
    obj, caught = import_name("resid", name)
    assert obj is not None and caught == []


@pytest.mark.parametrize("flat,home", sorted(DOCUMENTED.items()))
def test_documented_modules_re_export_their_layer(flat, home):
    """The README's module names are files whose every name is the layer module's own
    object, imported without a warning."""
    mod, layer = importlib.import_module(flat), importlib.import_module(home)
    assert mod.__file__ != layer.__file__
    assert len(mod.__all__) >= 2
    for name in mod.__all__:
        obj, caught = import_name(flat, name)
        assert caught == [], (flat, name)
        if name != "correlation":  # resid.patching.correlation: resid.core.labelled's
            assert obj is getattr(layer, name), (flat, name)


@pytest.mark.parametrize("flat,home", sorted(DEPRECATED.items()))
def test_deprecated_modules_forward_every_name_with_a_warning(flat, home):
    mod, layer = importlib.import_module(flat), importlib.import_module(home)
    assert mod.__file__ != layer.__file__
    assert mod.__all__, flat
    for name in mod.__all__:
        obj, caught = import_name(flat, name)
        assert len(caught) == 1, (flat, name)
        message = str(caught[0].message)
        assert f"{flat}.{name}" in message and "import it as" in message
        new_place = message.split("import it as ")[1].split(" ")[0]
        assert resolve(new_place) is obj, (flat, name, new_place)  # the place it names is right
        if new_place.startswith(home + "."):
            assert obj is getattr(layer, name)
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


@pytest.mark.parametrize("old,new", sorted(MOVED.items()), ids=lambda x: ".".join(x))
def test_names_that_moved_import_from_their_old_place_with_a_warning(old, new):
    obj, caught = import_name(*old)
    target = getattr(importlib.import_module(new[0]), new[1])
    assert obj is target
    assert len(caught) == 1
    message = str(caught[0].message)
    assert new[1] in message and message.split("import it as ")[1].startswith("resid")
    # and the new place it names works, without a warning
    where = message.split("import it as ")[1].split(" ")[0]
    module, _, name = where.rpartition(".")
    if module != "resid" or name in resid.__all__:
        assert import_name(module, name) == (target, [])


def test_functions_that_became_cache_methods_still_work(tiny, tokens):
    """``resid.decompose.require`` and ``head_results`` were functions of a cache; they are
    its methods now, and the old functions call them."""
    _, cache = tiny.run_with_cache(tokens[:1], names_filter=["blocks.1.attn.hook_z"])
    head_results, caught = import_name("resid.decompose", "head_results")
    assert len(caught) == 1 and "ActivationCache.head_results" in str(caught[0].message)
    torch.testing.assert_close(head_results(cache, 1), cache.head_results(1))
    require, caught = import_name("resid.decompose", "require")
    assert len(caught) == 1 and "ActivationCache.require" in str(caught[0].message)
    require(cache, ["blocks.1.attn.hook_z"], "x", "y")
    with pytest.raises(KeyError, match="blocks.0.attn.hook_z"):
        require(cache, ["blocks.0.attn.hook_z"], "x", "y")


def test_star_imports_of_documented_modules_give_their_names():
    scope: dict = {}
    exec("from resid.patching import *", scope)  # noqa: S102
    assert {"sweep", "patch", "attribution_patch", "correlation"} <= set(scope)
