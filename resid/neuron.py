"""Deprecated: ``resid.neuron``, a module of the flat layout, is now ``resid.core.neuron``.

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core import neuron as _new
from resid.core.deprecation import forwarded

__getattr__, __all__ = forwarded(__name__, _new)
