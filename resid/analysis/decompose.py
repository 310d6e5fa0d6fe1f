"""Deprecated: decomposition moved to ``resid.core.decompose`` (the cache's own methods
need it, and the cache is part of the core)."""

from resid.core import decompose as _new
from resid.core.deprecation import forwarded
from resid.core.labelled import Labelled

__getattr__, __all__ = forwarded(__name__, _new, {"Components": (Labelled, "resid.Labelled")})
