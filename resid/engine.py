"""Deprecated: ``resid.engine``, a module of the flat layout, is now ``resid.interventions.engine``.

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core.deprecation import forwarded
from resid.interventions import engine as _new

__getattr__, __all__ = forwarded(__name__, _new)
