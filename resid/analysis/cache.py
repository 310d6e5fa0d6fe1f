"""Deprecated: ``AnalysisCache`` was the cache with the analyses as methods, a subclass
that ``import resid`` swapped in. There is one cache now, ``resid.ActivationCache``
(``resid.core.cache``), and every cache has every method."""

from resid.core.cache import ActivationCache
from resid.core.deprecation import moved

__getattr__ = moved(__name__, {"AnalysisCache": (ActivationCache, "resid.ActivationCache")})
