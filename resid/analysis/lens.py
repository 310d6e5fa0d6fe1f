"""Deprecated: the logit lens and direct logit attribution moved to ``resid.core.lens``
(the cache's own methods need them, and the cache is part of the core)."""

from resid.core import lens as _new
from resid.core.deprecation import forwarded

__getattr__, __all__ = forwarded(__name__, _new)
