"""Writing attention plots to disk: a page per head and an index of them all, offline.

>>> write_attention(model, "The cat sat on the mat", "attn")    # attn/index.html, attn/L0H0.html, …
>>> write_attention(model, ["one prompt", "another"], "attn")  # attn/01-one-prompt/, attn/02-another/

A folder holds ``index.html`` (a layers x heads grid of thumbnails, each a link to the
head's page, with its detector scores), ``L{layer}H{head}.html`` per head, and, with
``formats`` naming them, ``L{layer}H{head}.png`` / ``.svg``. The plotly JavaScript is
written once, as ``plotly.min.js`` in the output folder, and the pages load it by a
relative ``<script src>``: nothing is fetched from the network. Thumbnails are tiny PNGs
inlined as ``data:`` URIs (one pixel per cell), so the index stays light for 12 x 12 heads.

Nothing half-written is left as if complete, and nothing resid did not write is deleted:
everything is written into a hidden folder beside ``out`` with a manifest of the files and
their hashes (``resid-manifest.json``) and swapped in for ``out`` at the end
(``resid.core.files``). An existing ``out`` is replaced only when it is empty or holds
exactly an earlier ``resid attention`` output; otherwise the files it did not write are
named and nothing is touched. SIGINT and SIGTERM leave the previous output in place.
"""

from __future__ import annotations

import base64
import html
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import plotly.colors
import plotly.offline
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

from resid.core import files
from resid.viz import images
from resid.viz.plots import COLORSCALE, SCORE_NAMES, Attention, attention, head_figure, masked

if TYPE_CHECKING:
    from resid.core.model import Model

MARKER = '<meta name="generator" content="resid attention">'
PLOTLY_JS = "plotly.min.js"
IMAGE_FORMATS = ("png", "svg")
CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
a{color:#1a5fb4;text-decoration:none} .tokens span{background:#eee;margin:1px;padding:0 2px;
font-family:monospace;white-space:pre} table.grid{border-collapse:collapse}
.grid td,.grid th{padding:3px 2px;text-align:center;font-size:11px;vertical-align:top}
.grid img{width:80px;height:80px;image-rendering:pixelated;border:1px solid #ccc;
background:#fafafa;display:block;margin:auto} .grid td:hover{background:#eef}
.s{font-family:monospace;color:#555;white-space:nowrap;font-size:10px} .top td{padding:0 8px}
.legend{color:#555;font-size:13px;max-width:70em}"""


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _lut(n: int = 256) -> np.ndarray:
    """``[n, 3]`` uint8 RGB colours of the plots' colour scale, for weights 0 .. 1."""
    scale = plotly.colors.get_colorscale(COLORSCALE)
    stops = np.array([s for s, _ in scale])
    rgb = np.array([plotly.colors.unlabel_rgb(plotly.colors.convert_colors_to_same_type(c)[0][0])
                    for _, c in scale])  # fmt: skip
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, stops, rgb[:, i]) for i in range(3)], 1).round().astype(np.uint8)


LUT = _lut()


def thumbnail_png(pattern: Float[Tensor, "query_pos key_pos"]) -> bytes:
    """A PNG with one pixel per cell, in the plots' colours; masked cells are transparent."""
    z = masked(pattern)
    hidden = np.isnan(z)
    rgb = LUT[(np.nan_to_num(z).clip(0, 1) * (len(LUT) - 1)).round().astype(int)]
    rgba = np.concatenate([rgb, np.where(hidden, 0, 255).astype(np.uint8)[..., None]], -1)
    height, width = z.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in rgba)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))  # fmt: skip


def _fmt(score: float | None) -> str:
    return "–" if score is None else f"{score:.2f}"


def _scores_line(att: Attention, layer: int, head: int, sep: str = " ") -> str:
    parts = [
        f"{short} {_fmt(att.scores[name][layer, head])}" for name, short in SCORE_NAMES.items()
    ]
    return sep.join(parts)


def _page(title: str, body: str, script_src: str | None = None) -> str:
    script = f'<script src="{script_src}" charset="utf-8"></script>' if script_src else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{MARKER}'
            f"<title>{html.escape(title)}</title><style>{CSS}</style>{script}</head>"
            f"<body>{body}</body></html>\n")  # fmt: skip


def _tokens_html(att: Attention) -> str:
    return "".join(f'<span title="position {i}">{html.escape(lbl.split(" ", 1)[1])}</span>'
                   for i, lbl in enumerate(att.labels))  # fmt: skip


def _legend() -> str:
    return ("<p class=legend>prev: attention to the previous token · ind: induction (to the token "
            "after an earlier copy of this one) · bos: to position 0 · dup: to earlier copies "
            "of this token · – : undefined on this prompt (no repeated token). Whitespace: "
            "· space, ⏎ newline, ⇥ tab. Colours: 0 → 1, the same scale on every head.</p>")  # fmt: skip


def index_html(att: Attention, title: str, up: str | None = None) -> str:
    """The layers x heads grid: thumbnail links and detector scores."""
    head_cells = "".join(f"<th>head {h}</th>" for h in att.heads)
    rows = []
    for layer, p in att.patterns.items():
        cells = []
        for h in att.heads:
            name = head_name(layer, h)
            png = base64.b64encode(thumbnail_png(p[h])).decode()
            cells.append(f'<td><a href="{name}.html" title="{name}: {_scores_line(att, layer, h)}">'
                         f'<img alt="{name}" src="data:image/png;base64,{png}"></a>'
                         f'<span class=s>{name}<br>{_scores_line(att, layer, h, "<br>")}</span></td>')  # fmt: skip
        rows.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
    top = []
    for name, short in SCORE_NAMES.items():
        ranked = sorted(
            ((s, k) for k, s in att.scores[name].items() if s is not None), reverse=True
        )
        if ranked:
            links = ", ".join(f'<a href="{head_name(*k)}.html">{head_name(*k)}</a> {s:.2f}'
                              for s, k in ranked[:5])  # fmt: skip
            top.append(f"<tr><td>{short}</td><td>{links}</td></tr>")
    nav = f'<p><a href="{up}">↑ all prompts</a></p>' if up else ""
    body = (f"{nav}<h2>{html.escape(title)}</h2><p class=tokens>{_tokens_html(att)}</p>"
            f"<h3>Top heads</h3><table class=top>{''.join(top)}</table>{_legend()}"
            f"<table class=grid><tr><th></th>{head_cells}</tr>{''.join(rows)}</table>")  # fmt: skip
    return _page(title, body)


def head_html(att: Attention, layer: int, head: int, fig, title: str, js: str) -> str:
    """One head's page: its heatmap (plotly, from ``js``), scores and links to its neighbours."""
    keys = [(lay, h) for lay in att.patterns for h in att.heads]
    i = keys.index((layer, head))
    prev_link = (
        f'<a href="{head_name(*keys[i - 1])}.html">← {head_name(*keys[i - 1])}</a>' if i else ""
    )
    next_link = (f'<a href="{head_name(*keys[i + 1])}.html">{head_name(*keys[i + 1])} →</a>'
                 if i + 1 < len(keys) else "")  # fmt: skip
    plot = fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=f"plot-{head_name(layer, head)}",
        config={"displaylogo": False},  # the logo links to plotly's website
    )
    body = (f'<p>{prev_link} · <a href="index.html">index</a> · {next_link}</p>'
            f"<h2>{html.escape(title)}</h2><p class=s>{_scores_line(att, layer, head)}</p>"
            f"{plot}{_legend()}")  # fmt: skip
    return _page(f"{head_name(layer, head)} · {title}", body, js)


# ---- writing ------------------------------------------------------------------------


WRITER = "resid attention"


def check_out(out: str | Path) -> None:
    """Raise ``OSError`` now, before any work, if ``write_attention`` could not write ``out``:
    it cannot be created, or it holds files ``resid attention`` did not write (named)."""
    files.check_target(out, WRITER, "--out")


@contextmanager
def staging(out: str | Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` to write into, swapped in for ``out`` on success
    (with a manifest of what was written) and removed on failure, SIGINT or SIGTERM. Raises
    ``OSError`` when ``out`` cannot be written or holds files resid did not write."""
    with files.replace_folder(out, WRITER, "--out") as tmp:
        yield tmp


def _slug(prompt: str, i: int) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:40].rstrip("-")
    return f"{i:02d}-{words or 'prompt'}"


def _export_images(figs: dict, folder: Path, formats: list[str], progress: bool) -> str | None:
    """Write static images (bounded in time, see ``resid.viz.images``); the reason as one
    line if they cannot be written."""
    jobs = [(fig, folder / f"{head_name(*k)}.{fmt}") for fmt in formats for k, fig in figs.items()]
    return images.export([f for f, _ in jobs], [p for _, p in jobs], progress,
                         "/".join(formats).upper())  # fmt: skip


def _write_prompt(model, prompt, folder: Path, js: str, up, layers, heads, formats, truncate,
                  progress, label) -> tuple[int, list[str]]:  # fmt: skip
    att = attention(model, prompt, layers, heads, truncate=truncate)
    title = f"{label}: {prompt if len(prompt) <= 80 else prompt[:77] + '…'}"
    (folder / "index.html").write_text(index_html(att, title, up), encoding="utf-8")
    keys = [(layer, h) for layer in att.patterns for h in att.heads]
    figs = {}
    for layer, h in tqdm(keys, desc="heads", unit="head", disable=not progress,
                         file=sys.stderr, leave=False):  # fmt: skip
        fig = head_figure(att.patterns[layer][h], att.labels, f"layer {layer}, head {h}")
        page = head_html(att, layer, h, fig, title, js)
        (folder / f"{head_name(layer, h)}.html").write_text(page, encoding="utf-8")
        figs[layer, h] = fig
    messages = []
    images = [f for f in formats if f in IMAGE_FORMATS]
    if images:
        message = _export_images(figs, folder, images, progress)
        if message:
            messages.append(message)
    return len(keys), messages


def write_attention(
    model: Model,
    prompts: str | list[str],
    out: str | Path,
    layers: str | list[int] | None = None,
    heads: str | list[int] | None = None,
    formats: tuple[str, ...] | list[str] = ("html",),
    truncate: bool = False,
    progress: bool = True,
    label: str = "attention",
) -> tuple[Path, int, list[str]]:
    """Write every selected head's plot for each prompt under ``out``; returns ``out``, the
    number of head plots written and one-line messages (e.g. why PNG export was skipped). HTML is always written.

    One prompt (a string) fills ``out`` itself; a list of prompts gets one folder each,
    ``out/NN-first-words/``, sharing ``out/plotly.min.js``, with ``out/index.html`` listing them.

    >>> folder, n_plots, notes = write_attention(model, "Hello world", "attn", layers="0-1", formats=["html", "png"])
    """
    unknown = set(formats) - {"html", *IMAGE_FORMATS}
    if unknown:
        raise ValueError(f"unknown format {sorted(unknown)[0]!r}: choose from html, png, svg")
    many = not isinstance(prompts, str)
    prompt_list = list(prompts) if many else [prompts]
    if not prompt_list:
        raise ValueError("no prompts given")
    messages: list[str] = []
    n_plots = 0
    with staging(out) as tmp:
        (tmp / PLOTLY_JS).write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
        if not many:
            n_plots, notes = _write_prompt(model, prompts, tmp, PLOTLY_JS, None, layers, heads, formats,
                                     truncate, progress, label)  # fmt: skip
            messages += notes
        else:
            items = []
            for i, prompt in enumerate(tqdm(prompt_list, desc="prompts", unit="prompt",
                                            disable=not progress or len(prompt_list) == 1,
                                            file=sys.stderr), start=1):  # fmt: skip
                sub = tmp / _slug(prompt, i)
                sub.mkdir()
                n, notes = _write_prompt(model, prompt, sub, f"../{PLOTLY_JS}", "../index.html",
                                         layers, heads, formats, truncate, progress, label)  # fmt: skip
                n_plots += n
                if notes:  # export failed once: it will fail again, so stop trying
                    messages += notes
                    formats = ["html"]
                items.append(f'<li><a href="{sub.name}/index.html">{html.escape(prompt)}</a></li>')
            body = f"<h2>{html.escape(label)}: {len(items)} prompts</h2><ol>{''.join(items)}</ol>"
            (tmp / "index.html").write_text(_page(label, body), encoding="utf-8")
    return Path(os.path.abspath(Path(out).expanduser())), n_plots, messages
