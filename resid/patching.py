"""Patching: replace activations at any site with those of another run: one patch, batched
sweeps over layers, positions and heads, and attribution patching.

The README's import path; the code lives in ``resid.interventions.patching``.

>>> from resid.patching import attribution_patch
"""

from resid.core.labelled import correlation
from resid.interventions.patching import (
    Source,
    Sweep,
    attribution_patch,
    evaluate,
    metric_gradients,
    patch,
    sweep,
)

__all__ = [
    "Source",
    "Sweep",
    "attribution_patch",
    "correlation",
    "evaluate",
    "metric_gradients",
    "patch",
    "sweep",
]
