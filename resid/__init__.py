"""resid: a hooked GPT-2 whose residual stream is a first-class data structure.

The package is layered, and imports point one way:
``core`` <- ``analysis`` <- ``interventions`` <- ``sae``, ``harvest`` <- ``io``, ``viz`` <- ``cli``.
This file composes them: it re-exports the short public names. The modules the README
imports from (``resid.patching``, ``resid.metrics``, ``resid.stream``, …) are real files
next to this one that re-export their layer's module; the flat layout's other module
names (``resid.model``, ``resid.config``, …) are files too, whose names still import with
a ``DeprecationWarning`` naming their new place. Nothing is patched at import.

>>> import resid
>>> model = resid.load("gpt2")
>>> logits, cache = model.run_with_cache("The Eiffel Tower is in")
>>> cache.logit_attribution(" Paris").top(5, pos=-1)
"""

import importlib
import importlib.util
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for readers and type checkers; at run time each name loads on first use
    from resid import (
        circuits,
        decompose,
        detectors,
        generation,
        metrics,
        patching,
        path_patching,
        sae,
        stream,
    )
    from resid.core.cache import ActivationCache
    from resid.core.config import Config
    from resid.core.factored import FactoredMatrix
    from resid.core.head import Head
    from resid.core.hooks import HookPoint
    from resid.core.kv_cache import KVCache
    from resid.core.labelled import Labelled, correlation
    from resid.core.model import Model
    from resid.core.names import act_name
    from resid.core.neuron import Neuron
    from resid.core.processing import process_weights
    from resid.core.stream import ResidualStream, State
    from resid.core.tokenizer import Tokenizer
    from resid.io.loading import CheckpointError, load, save

# Every name loads on first use, so `import resid` costs no torch until a name is used
# (`resid --help` answers at once). Where each short name lives:
_NAMES = {
    "ActivationCache": "resid.core.cache",
    "Config": "resid.core.config",
    "FactoredMatrix": "resid.core.factored",
    "Head": "resid.core.head",
    "HookPoint": "resid.core.hooks",
    "KVCache": "resid.core.kv_cache",
    "Labelled": "resid.core.labelled",
    "correlation": "resid.core.labelled",
    "Model": "resid.core.model",
    "act_name": "resid.core.names",
    "process_weights": "resid.core.processing",
    "Neuron": "resid.core.neuron",
    "ResidualStream": "resid.core.stream",
    "State": "resid.core.stream",
    "Tokenizer": "resid.core.tokenizer",
    "CheckpointError": "resid.io.loading",
    "load": "resid.io.loading",
    "save": "resid.io.loading",
}
# the modules the README imports from, and the flat layout's other module names (which
# warn, from their own files, when a user still asks for one)
_MODULES = (
    "circuits", "decompose", "detectors", "generation", "metrics", "patching", "path_patching",
    "sae", "stream", "attention_pages", "plots", "harvest", "cache", "compare", "config",
    "engine", "factored", "functional", "head", "hooks", "kv_cache", "labelled", "layers",
    "lens", "loading", "model", "names", "neuron", "references", "suffix", "tokenizer",
)  # fmt: skip
_MOVED = {"AnalysisCache": "ActivationCache", "Components": "Labelled"}  # old name -> new


def __getattr__(name: str) -> Any:
    """A short name, a module of ``_MODULES`` or any other subpackage or module of resid,
    or a moved name (with a DeprecationWarning), imported when first asked for."""
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # asked for once
        return value
    if name in _MODULES or (not name.startswith("_") and _is_submodule(name)):
        return importlib.import_module(f"{__name__}.{name}")  # resid.graphs, resid.core, …
    if name in _MOVED:
        new = _MOVED[name]
        warnings.warn(
            f"resid.{name} has moved: import it as resid.{new} (the old name will go in a "
            "later release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_submodule(name: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{name}") is not None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_MODULES))


__all__ = [
    "ActivationCache",
    "CheckpointError",
    "Config",
    "FactoredMatrix",
    "Head",
    "HookPoint",
    "KVCache",
    "Labelled",
    "Model",
    "Neuron",
    "ResidualStream",
    "State",
    "Tokenizer",
    "act_name",
    "circuits",
    "correlation",
    "decompose",
    "detectors",
    "generation",
    "load",
    "metrics",
    "patching",
    "path_patching",
    "process_weights",
    "sae",
    "save",
    "stream",
]
__version__ = "0.1.0"
