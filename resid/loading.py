"""Deprecated: ``resid.loading``, a module of the flat layout, is now ``resid.io.loading``.

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core.deprecation import forwarded
from resid.io import loading as _new

__getattr__, __all__ = forwarded(__name__, _new)
