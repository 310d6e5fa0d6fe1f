"""Attention plots (plotly).

The README's import path; the code lives in ``resid.viz.plots``.

>>> from resid.plots import attention
"""

from resid.viz.plots import (
    COLORSCALE,
    SCORE_NAMES,
    WHITESPACE,
    Attention,
    attention,
    attention_heads,
    display_token,
    head_figure,
    masked,
    parse_indices,
    token_labels,
)

__all__ = [
    "Attention",
    "COLORSCALE",
    "SCORE_NAMES",
    "WHITESPACE",
    "attention",
    "attention_heads",
    "display_token",
    "head_figure",
    "masked",
    "parse_indices",
    "token_labels",
]
