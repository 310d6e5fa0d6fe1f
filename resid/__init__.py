"""resid: a hooked GPT-2 whose residual stream is a first-class data structure."""

from resid.cache import ActivationCache
from resid.factored import FactoredMatrix
from resid.head import Head
from resid.hooks import HookPoint
from resid.loading import CheckpointError, load, save
from resid.model import Config, Model
from resid.tokenizer import Tokenizer

__all__ = [
    "ActivationCache",
    "CheckpointError",
    "Config",
    "FactoredMatrix",
    "Head",
    "HookPoint",
    "Model",
    "Tokenizer",
    "load",
    "save",
]
__version__ = "0.1.0"
