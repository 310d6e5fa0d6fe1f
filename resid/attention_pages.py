"""Attention pages: a folder of HTML pages, one per head.

The README's import path; the code lives in ``resid.viz.attention_pages``.

>>> from resid.attention_pages import check_out
"""

from resid.viz.attention_pages import (
    CSS,
    IMAGE_FORMATS,
    LUT,
    MARKER,
    PLOTLY_JS,
    WRITER,
    check_out,
    head_html,
    head_name,
    index_html,
    staging,
    thumbnail_png,
    write_attention,
)

__all__ = [
    "CSS",
    "IMAGE_FORMATS",
    "LUT",
    "MARKER",
    "PLOTLY_JS",
    "WRITER",
    "check_out",
    "head_html",
    "head_name",
    "index_html",
    "staging",
    "thumbnail_png",
    "write_attention",
]
