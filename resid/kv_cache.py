"""Deprecated: ``resid.kv_cache``, a module of the flat layout, is now ``resid.core.kv_cache``.

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core import kv_cache as _new
from resid.core.deprecation import forwarded

__getattr__, __all__ = forwarded(__name__, _new)
