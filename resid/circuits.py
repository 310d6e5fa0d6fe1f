"""Circuits from the weights: composition and copying scores.

The README's import path; the code lives in ``resid.analysis.circuits``.

>>> from resid.circuits import composition_score
"""

from resid.analysis.circuits import (
    Mode,
    composition_score,
    composition_scores,
    copying_scores,
)

__all__ = ["Mode", "composition_score", "composition_scores", "copying_scores"]
