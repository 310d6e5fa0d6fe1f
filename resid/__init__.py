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
from typing import Any

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
from resid.core.deprecation import moved
from resid.core.factored import FactoredMatrix
from resid.core.head import Head
from resid.core.hooks import HookPoint
from resid.core.kv_cache import KVCache
from resid.core.labelled import Labelled, correlation
from resid.core.model import Model
from resid.core.names import act_name
from resid.core.neuron import Neuron
from resid.core.stream import ResidualStream, State
from resid.core.tokenizer import Tokenizer
from resid.io.loading import CheckpointError, load, save

# modules loaded on first use: the plots import plotly, harvesting torch.distributed, and
# the flat layout's deprecated module names load only when a user still asks for one
_ON_USE = (
    "attention_pages", "plots", "harvest", "cache", "compare", "config", "engine", "factored",
    "functional", "head", "hooks", "kv_cache", "labelled", "layers", "lens", "loading",
    "model", "names", "neuron", "references", "suffix", "tokenizer",
)  # fmt: skip
_moved = moved(
    __name__,
    {
        "AnalysisCache": (ActivationCache, "resid.ActivationCache"),
        "Components": (Labelled, "resid.Labelled"),
    },
)


def __getattr__(name: str) -> Any:
    """``resid.plots`` and the other modules of ``_ON_USE`` load when first asked for;
    ``resid.AnalysisCache`` and ``resid.Components`` answer with a DeprecationWarning."""
    if name in _ON_USE:
        return importlib.import_module(f"{__name__}.{name}")
    return _moved(name)


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
    "sae",
    "save",
    "stream",
]
__version__ = "0.1.0"
