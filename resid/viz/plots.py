"""Per-head attention heatmaps as plotly figures: query tokens down, key tokens across.

>>> figs = attention_heads(model, "The cat sat on the mat. The cat", layers=[0, 1])
>>> figs[0, 3].show()                       # layer 0, head 3
>>> figs[0, 3].data[0].z                    # the pattern, NaN above the diagonal

Token labels make whitespace visible (``display_token``: a space is ``·``, a newline
``⏎``, a tab ``⇥``, other control characters ``\\xNN``) and start with the position, so
that a repeated token gets a row of its own: ``"2 ·cat"``. The colour scale is fixed to
[0, 1] so that heads can be compared by eye; cells a query cannot attend to (keys after
it) are NaN, drawn blank, not 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from resid.analysis import detectors
from resid.core.names import act_name

if TYPE_CHECKING:
    from resid.core.model import Model

COLORSCALE = "Viridis"
WHITESPACE = {" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def display_token(token: str) -> str:
    """``token`` with whitespace and control characters made visible: ``" cat\\n"`` -> ``"·cat⏎"``."""
    return (
        "".join(WHITESPACE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in token)
        or "∅"
    )


def token_labels(str_tokens: list[str]) -> list[str]:
    """Unique axis labels: position, a space, the displayed token: ``["0 <|endoftext|>", "1 The"]``."""
    return [f"{i} {display_token(t)}" for i, t in enumerate(str_tokens)]


def parse_indices(spec: str | list[int] | None, n: int, what: str = "layer") -> list[int]:
    """``"0,3-5"`` -> ``[0, 3, 4, 5]``; ``None`` -> all ``n``. Raises ``ValueError`` naming
    the valid range when an index is out of it."""
    if spec is None:
        return list(range(n))
    if isinstance(spec, str):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, sep, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ValueError(
                    f"cannot read {what}s {spec!r}: use numbers and ranges, e.g. 0,3-5"
                ) from None
            if b < a:
                raise ValueError(f"{what} range {part!r} is backwards: write {b}-{a}")
            if not (0 <= a < n and 0 <= b < n):  # before expanding: 0-10000000000 is one line
                bad = a if not 0 <= a < n else b
                raise ValueError(
                    f"{what} {bad} is out of range: this model has {what}s 0-{n - 1}"
                    if n
                    else f"this model has no {what}s"
                )
            out.extend(range(a, b + 1))
        spec = out
    if not spec:
        raise ValueError(f"no {what}s selected")
    bad = [i for i in spec if not 0 <= i < n]
    if bad:
        raise ValueError(
            f"{what} {bad[0]} is out of range: this model has {what}s 0-{n - 1}"
            if n
            else f"this model has no {what}s"
        )
    return sorted(set(spec))


@dataclass
class Attention:
    """One prompt's attention: patterns per selected layer, the tokens, per-head scores."""

    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    patterns: dict[int, Float[Tensor, "head query_pos key_pos"]]  # layer -> all its heads
    heads: list[int]
    scores: dict[str, dict[tuple[int, int], float | None]]  # name -> (layer, head) -> score

    @property
    def labels(self) -> list[str]:
        return token_labels(self.str_tokens)


SCORE_NAMES = {"previous_token": "prev", "induction": "ind", "bos": "bos", "duplicate_token": "dup"}


@torch.no_grad()
def attention(
    model: Model,
    prompt: str | Int[Tensor, " pos"],
    layers: str | list[int] | None = None,
    heads: str | list[int] | None = None,
    truncate: bool = False,
) -> Attention:
    """Run ``prompt`` (BOS prepended to a string) and keep the selected heads' patterns and
    detector scores. A prompt longer than the context raises, or with ``truncate=True`` keeps
    its first ``n_ctx`` tokens with a warning.

    >>> att = attention(model, "Hello world", layers="0-1")
    >>> att.patterns[0].shape                    # [head, query_pos, key_pos]
    """
    cfg = model.cfg
    layers = parse_indices(layers, cfg.n_layers, "layer")
    heads = parse_indices(heads, cfg.n_heads, "head")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token of text")
        tokens = model.to_tokens(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt).flatten()
    if len(tokens) > cfg.n_ctx:
        if not truncate:
            raise ValueError(
                f"the prompt is {len(tokens)} tokens, more than the context of {cfg.n_ctx}: "
                f"shorten it, or pass --truncate to keep the first {cfg.n_ctx}"
            )
        warnings.warn(
            f"the prompt is {len(tokens)} tokens; keeping the first {cfg.n_ctx} (the context)",
            stacklevel=2,
        )
        tokens = tokens[: cfg.n_ctx]
    tokens = model.tokens(tokens)  # checks the vocabulary, moves to the model's device
    names = [act_name("pattern", layer) for layer in layers]
    _, cache = model.run_with_cache(
        tokens, names_filter=names, device="cpu", stop_at_layer=max(layers) + 1
    )
    patterns = {layer: cache[name][0].float() for layer, name in zip(layers, names, strict=True)}
    return Attention(
        tokens=tokens[0].cpu(),
        str_tokens=model.to_str_tokens(tokens[0]),
        patterns=patterns,
        heads=heads,
        scores=_scores(patterns, heads, tokens.cpu()),
    )


def _scores(patterns, heads, tokens) -> dict[str, dict[tuple[int, int], float | None]]:
    """Detector scores per head; ``None`` where a score is undefined on this prompt (no
    repeated token, so no query has a duplicate or an induction target)."""
    same = tokens[0, :, None] == tokens[0, None, :]
    defined = {
        "previous_token": len(tokens[0]) > 1,
        "bos": True,
        "duplicate_token": bool(same.tril(-1).any()),
        "induction": bool((tokens[0, :, None] == tokens[0, None, :-1]).tril(-1).any()),
    }
    out: dict[str, dict[tuple[int, int], float | None]] = {name: {} for name in SCORE_NAMES}
    for layer, p in patterns.items():
        p = p[None]  # [1, head, q, k]
        per_head = {
            "previous_token": detectors.previous_token_score(p),
            "induction": detectors.induction_score(p, tokens),
            "bos": detectors.bos_score(p),
            "duplicate_token": detectors.duplicate_token_score(p, tokens),
        }
        for name, values in per_head.items():
            for h in heads:
                out[name][layer, h] = float(values[h]) if defined[name] else None
    return out


def masked(pattern: Float[Tensor, "query_pos key_pos"]) -> Float[np.ndarray, "query_pos key_pos"]:
    """The pattern as float32 numpy with NaN where the key comes after the query."""
    z = pattern.detach().float().cpu().numpy().copy()
    z[np.triu_indices_from(z, k=1)] = np.nan
    return z


def head_figure(
    pattern: Float[Tensor, "query_pos key_pos"], labels: list[str], title: str = ""
) -> go.Figure:
    """One head's heatmap: queries down, keys across, [0, 1] colour scale, NaN above the
    diagonal (blank), the exact weight on hover.

    >>> fig = head_figure(cache["blocks.0.attn.hook_pattern"][0, 3], token_labels(toks), "L0H3")
    """
    n = len(labels)
    side = min(1000, 260 + 24 * n)
    heatmap = go.Heatmap(
        z=masked(pattern),
        x=labels,
        y=labels,
        zmin=0,
        zmax=1,
        colorscale=COLORSCALE,
        hoverongaps=False,
        colorbar=dict(title="weight", thickness=14),
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.8g}<extra></extra>",
    )
    axis = dict(type="category", tickfont=dict(size=11), automargin=True, showgrid=False)
    return go.Figure(
        heatmap,
        layout=dict(
            title=dict(text=title),
            width=side + 120,
            height=side,
            xaxis=dict(axis, title="key", side="top", tickangle=-60),
            yaxis=dict(axis, title="query", autorange="reversed", scaleanchor="x"),
            plot_bgcolor="white",
            margin=dict(l=10, r=10, t=60, b=10),
        ),
    )


def attention_heads(
    model: Model,
    prompt: str | Int[Tensor, " pos"],
    layers: str | list[int] | None = None,
    heads: str | list[int] | None = None,
) -> dict[tuple[int, int], go.Figure]:
    """A heatmap per head, keyed by ``(layer, head)``; all heads unless ``layers`` /
    ``heads`` (lists, or strings like ``"0,3-5"``) narrow it.

    >>> figs = attention_heads(model, "When Mary and John went to the store", layers=[9])
    >>> figs[9, 6]                                    # a plotly Figure
    """
    att = attention(model, prompt, layers, heads)
    return {
        (layer, h): head_figure(p[h], att.labels, f"layer {layer}, head {h}")
        for layer, p in att.patterns.items()
        for h in att.heads
    }
