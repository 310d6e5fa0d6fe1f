"""Deprecated: :class:`ActivationStore` lives in :mod:`resid.harvest.activation_store` now;
this module re-exports it and warns."""

import warnings

from resid.harvest.activation_store import ActivationStore

warnings.warn(
    "resid.io.activation_store moved to resid.harvest.activation_store (ActivationStore): "
    "import it from there",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["ActivationStore"]
