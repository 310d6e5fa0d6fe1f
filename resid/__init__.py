"""resid: a hooked GPT-2 whose residual stream is a first-class data structure.

The package is layered, and imports point one way:
``core`` <- ``analysis`` <- ``interventions`` <- ``io``, ``viz`` <- ``cli``.
This file composes them: it re-exports the short public names and keeps the module
names of the flat layout (``resid.patching``, ``resid.stream``, …) importable.
"""

import sys

from resid.analysis import circuits, decompose, detectors, lens
from resid.analysis.cache import AnalysisCache
from resid.core import (
    cache,
    config,
    factored,
    functional,
    generation,
    head,
    hooks,
    kv_cache,
    labelled,
    layers,
    model,
    names,
    neuron,
    stream,
    tokenizer,
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
from resid.core.stream import ResidualStream, State
from resid.core.tokenizer import Tokenizer
from resid.interventions import engine, metrics, patching, path_patching, sae
from resid.io import compare, loading, references
from resid.io.loading import CheckpointError, load, save
from resid.viz import attention_pages, plots

# run_with_cache hands back the cache with the analyses as methods
Model.cache_type = AnalysisCache

# the flat layout's module names still import: `from resid.patching import sweep`
for _module in (
    cache, config, factored, functional, generation, head, hooks, kv_cache, labelled, layers,
    model, names, neuron, stream, tokenizer, circuits, decompose, detectors, lens, engine,
    metrics, patching, path_patching, sae, compare, loading, references, attention_pages, plots,
):  # fmt: skip
    sys.modules.setdefault(f"resid.{_module.__name__.rsplit('.', 1)[1]}", _module)
sys.modules.setdefault("resid.suffix", engine)
del _module

__all__ = [
    "ActivationCache",
    "AnalysisCache",
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
    "correlation",
    "load",
    "save",
]
__version__ = "0.1.0"
