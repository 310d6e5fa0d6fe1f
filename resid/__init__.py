"""resid: a hooked GPT-2 whose residual stream is a first-class data structure."""

from resid.cache import ActivationCache
from resid.decompose import Components
from resid.factored import FactoredMatrix
from resid.head import Head
from resid.hooks import HookPoint
from resid.loading import CheckpointError, load, save
from resid.model import Config, Model
from resid.neuron import Neuron
from resid.stream import ResidualStream, State
from resid.tokenizer import Tokenizer

__all__ = [
    "ActivationCache",
    "CheckpointError",
    "Components",
    "Config",
    "FactoredMatrix",
    "Head",
    "HookPoint",
    "Model",
    "Neuron",
    "ResidualStream",
    "State",
    "Tokenizer",
    "load",
    "save",
]
__version__ = "0.1.0"
