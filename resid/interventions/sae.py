"""Deprecated: SAEs moved to the package :mod:`resid.sae` (``resid.sae.SAE``,
``resid.sae.load``, ``resid.sae.attribute_features``, …). The names that were public
here still import, with a ``DeprecationWarning`` naming their new place.

This module sits in the interventions layer, below ``resid.sae``, so it forwards each
name when it is first asked for rather than importing the package at import time.
"""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    "SAE": "resid.sae.module",
    "Feature": "resid.sae.features",
    "FeatureCircuit": "resid.sae.circuits",
    "SAEConfig": "resid.sae.config",
    "SAEError": "resid.sae.config",
    "attribute_features": "resid.sae.circuits",
    "feature_circuit": "resid.sae.circuits",
    "load": "resid.sae.files",
    "patch_features": "resid.sae.circuits",
    "save": "resid.sae.files",
    "site_width": "resid.sae.sites",
    "ARCHITECTURES": "resid.sae.config",
    "Architecture": "resid.sae.config",
    "NORMALISATIONS": "resid.sae.config",
    "CFG_FILE": "resid.sae.files",
    "WEIGHTS_FILE": "resid.sae.files",
}

__all__ = sorted(_MOVED)  # each forwarded on first use (see __getattr__)


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"resid.interventions.sae.{name} moved to resid.sae.{name}: import it from resid.sae",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)


def __dir__() -> list[str]:
    return sorted(_MOVED)
