"""Deprecated: ``resid.head``, a module of the flat layout, is now ``resid.core.head``.

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core import head as _new
from resid.core.deprecation import forwarded

__getattr__, __all__ = forwarded(__name__, _new)
