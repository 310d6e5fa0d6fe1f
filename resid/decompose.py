"""Decomposition: the residual stream at any site as a sum of named writes.

The README's import path; the code lives in ``resid.core.decompose``. Names this module
had before the layered package still import from here, with a DeprecationWarning naming
their new place: ``Components`` (now ``resid.Labelled``), ``require`` and
``head_results`` (now methods of the cache).

>>> from resid.decompose import decomposition_hooks
"""

from resid.core.decompose import contributions, decomposition_hooks
from resid.core.deprecation import moved
from resid.core.labelled import Labelled as _Labelled


def _require(cache, names: list[str], needed_for: str, fix: str) -> None:
    """The flat layout's ``require(cache, ...)``: now ``cache.require(...)``."""
    cache.require(names, needed_for, fix)


def _head_results(cache, layer: int):
    """The flat layout's ``head_results(cache, layer)``: now ``cache.head_results(layer)``."""
    return cache.head_results(layer)


__all__ = ["contributions", "decomposition_hooks"]
__getattr__ = moved(
    __name__,
    {
        "Components": (_Labelled, "resid.Labelled"),
        "require": (_require, "the method ActivationCache.require"),
        "head_results": (_head_results, "the method ActivationCache.head_results"),
    },
)
