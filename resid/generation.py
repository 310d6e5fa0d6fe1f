"""Generation with a KV cache: ``generate`` and ``stream``.

The README's import path; the code lives in ``resid.core.generation``.

>>> from resid.generation import generate
"""

from resid.core.generation import (
    generate,
    left_padded,
    next_token_distribution,
    stream,
)

__all__ = ["generate", "left_padded", "next_token_distribution", "stream"]
