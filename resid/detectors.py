"""Head detectors: previous-token, induction, duplicate-token and BOS scores.

The README's import path; the code lives in ``resid.analysis.detectors``.

>>> from resid.detectors import bos_score
"""

from resid.analysis.detectors import (
    HEAD_PATTERNS,
    SCORES,
    Heads,
    Mask,
    Pattern,
    Where,
    bos_score,
    detect_head,
    duplicate_token_score,
    head_scores,
    induction_score,
    previous_token_score,
    repeated_tokens,
)

__all__ = [
    "HEAD_PATTERNS",
    "Heads",
    "Mask",
    "Pattern",
    "SCORES",
    "Where",
    "bos_score",
    "detect_head",
    "duplicate_token_score",
    "head_scores",
    "induction_score",
    "previous_token_score",
    "repeated_tokens",
]
