"""Dashboards of a harvest: one offline HTML page per neuron or feature, and an index.

>>> write_dashboard("harvest", "dash", model=model)   # dash/index.html, dash/<site>/<unit>.html

A unit's page shows its activation histogram (inline SVG), its top activating contexts
(each token shaded by the unit's activation there, the exact value on hover), and, for MLP
neurons (``blocks.L.mlp.hook_post``/``hook_pre``) when a model is given, its logit effect:
the tokens its write vector raises and lowers (``Neuron.logit_effect``). The index lists
every unit with its max, mean and density (fraction of tokens active), sortable by clicking
a column. Everything is in the pages: no script, style or font is fetched, and every
string from the corpus or the tokenizer is HTML-escaped.

The harvest is read through :mod:`resid.harvest.store` (its manifest checked, every file
confined to the harvest folder, a regular file of bounded size matching its SHA-256). The
folder is written whole (``resid.core.files``): to a hidden sibling, with a manifest of what
was written, then swapped in; an existing folder is replaced only when it holds exactly an
earlier ``resid dashboard`` output. Each site gets its own subfolder, named after the site
(made unique when two sites would share a name).
"""

from __future__ import annotations

import html
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from resid.core import files, names
from resid.core.neuron import Neuron
from resid.harvest import store
from resid.harvest.errors import HarvestError
from resid.viz.plots import parse_indices

if TYPE_CHECKING:
    from resid.core.model import Model
    from resid.sae import SAE

WRITER = "resid dashboard"
MARKER = '<meta name="generator" content="resid dashboard">'
CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;max-width:72em}
a{color:#1a5fb4;text-decoration:none} h2{margin-bottom:.2em} .meta{color:#555;font-size:13px}
table.units{border-collapse:collapse;font-size:13px} .units th{cursor:pointer;background:#eee;
position:sticky;top:0} .units td,.units th{padding:2px 10px;text-align:right}
.units td:first-child,.units th:first-child{text-align:left} .units tr:hover td{background:#eef}
.ctx{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;line-height:1.9;
margin:0 0 .3em 0} .ctx span{padding:1px 0;border-radius:2px} .ctx .max{outline:1.5px solid #000}
.val{display:inline-block;width:6em;color:#555;font-family:ui-monospace,monospace;font-size:12px}
.cols{display:flex;gap:3em;flex-wrap:wrap} .logit td{font-family:ui-monospace,monospace;
font-size:12px;padding:0 8px} .hist rect{fill:#e66100} .hist text{font-size:10px;fill:#555}"""
SORT_JS = """document.querySelectorAll('table.units th').forEach(function(th, col){
th.addEventListener('click', function(){var body=th.closest('table').tBodies[0];
var rows=Array.from(body.rows); var down=th.dataset.dir!=='desc'; th.dataset.dir=down?'desc':'asc';
rows.sort(function(a,b){var x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
var nx=parseFloat(x), ny=parseFloat(y); var c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(y):nx-ny;
return down?-c:c;}); rows.forEach(function(r){body.appendChild(r);});});});"""

Decode = Callable[[list[int]], list[str]]


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _show(token: str) -> str:
    """A token as displayed: newlines and tabs made visible, then escaped."""
    return _esc(token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍"))


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def _slug(site: str) -> str:
    """A folder name for ``site``: letters, digits, ``._-``; never hidden, ``.`` or ``..``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", site).lstrip(".") or "site"


def _slugs(sites: Sequence[str]) -> dict[str, str]:
    """A distinct folder name for each site (``_2``, ``_3``, … where two would collide,
    compared as a case-insensitive filesystem would)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for site in sites:
        base = slug = _slug(site)
        n = 1
        while slug.lower() in taken:
            n += 1
            slug = f"{base}_{n}"
        taken.add(slug.lower())
        out[site] = slug
    return out


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{MARKER}'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{body}{tail}"
            "</body></html>\n")  # fmt: skip


def _parse_units(spec: str | Sequence[int] | None, n: int) -> list[int]:
    """``--units`` (``"0-99,120"``, a list, or None for all) as sorted unit indices of a site
    with ``n`` units (:func:`resid.viz.plots.parse_indices`, naming the flag)."""
    try:
        return parse_indices(spec if spec is None or isinstance(spec, str) else list(spec), n,
                             "unit")  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ValueError(f"--units {spec!r} for a site of {n} units: {e}") from None


# ---- pieces of a unit page -------------------------------------------------------------


def histogram_svg(
    counts: torch.Tensor, edges: torch.Tensor, width: int = 560, height: int = 150
) -> str:
    """An inline SVG bar chart of the non-empty span of ``counts`` (one bar per bin, each
    with its range and count on hover)."""
    nz = counts.nonzero().flatten().tolist()
    if not nz:
        return "<p class=meta>no tokens</p>"
    lo, hi = nz[0], nz[-1]
    shown = counts[lo : hi + 1].tolist()
    top = max(shown)
    bw = width / len(shown)
    bars = []
    for i, c in enumerate(shown):
        b = lo + i
        left = "-∞" if b == 0 else f"{edges[b - 1].item():.3g}"
        right = "∞" if b == len(edges) else f"{edges[b].item():.3g}"
        h = 0 if c == 0 else max(1.0, (height - 20) * c / top)
        bars.append(f'<rect x="{i * bw:.2f}" y="{height - 15 - h:.2f}" width="{max(bw - 1, 1):.2f}" '
                    f'height="{h:.2f}"><title>[{left}, {right}): {c:,}</title></rect>')  # fmt: skip
    first = "-∞" if lo == 0 else f"{edges[lo - 1].item():.3g}"
    last = "∞" if hi == len(edges) else f"{edges[hi].item():.3g}"
    labels = (f'<text x="0" y="{height - 2}">{_esc(first)}</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{_esc(last)}</text>'
              f'<text x="{width}" y="10" text-anchor="end">max bin {top:,}</text>')  # fmt: skip
    return (
        f'<svg class=hist width="{width}" height="{height}" role="img" '
        f'aria-label="activation histogram">{"".join(bars)}{labels}</svg>'
    )


def _shade(value: float, scale: float) -> str:
    if math.isnan(value) or scale <= 0:
        return "transparent"
    a = min(abs(value) / scale, 1.0)
    return f"rgba(230,97,0,{a:.3f})" if value > 0 else f"rgba(26,95,180,{a:.3f})"


def context_html(
    tokens: list[str], acts: list[float], center: int, value: float, scale: float
) -> str:
    """One top context: tokens shaded by activation, the exact value in each ``title``."""
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts, strict=True)):
        if tok is None:
            continue
        cls = ' class="max"' if i == center else ""
        spans.append(f'<span{cls} style="background:{_shade(a, scale)}" '
                     f'title="{_esc(repr(tok))}: {_fmt(a)}">{_show(tok)}</span>')  # fmt: skip
    return f"<p class=ctx><span class=val>{_fmt(value)}</span>{''.join(spans)}</p>"


def _logit_html(model: Model | None, site: str, unit: int) -> str:
    p = names.parse(site)
    neuron = p is not None and not p.suffix and p.site.short in ("pre", "post")
    if model is None or not neuron or p.layer is None:
        return ""
    effect = Neuron(model, p.layer, unit).logit_effect(k=10)

    def rows(pairs):
        return "".join(f"<tr><td>{_show(t)}</td><td>{v:+.3f}</td></tr>" for t, v in pairs)

    return ("<h3>Logit effect</h3><p class=meta>the write vector W_out[i] through W_U "
            "(no final LayerNorm)</p><div class=cols>"
            f"<table class=logit><tr><th>raised</th><th></th></tr>{rows(effect.top)}</table>"
            f"<table class=logit><tr><th>lowered</th><th></th></tr>{rows(effect.bottom)}</table></div>")  # fmt: skip


def _feature_html(model: Model | None, sae: SAE | None, unit: int, k: int = 8) -> str:
    """A spliced-SAE feature's logit effect, and the features and MLP neurons whose write
    vectors point most nearly the same way as its decoder row (cosine)."""
    if sae is None:
        return ""
    parts = []
    W_dec = sae.W_dec.detach().float()
    row = W_dec[unit]
    cos = torch.nn.functional.cosine_similarity(W_dec, row[None], dim=-1)
    cos[unit] = -2.0  # not itself
    best = cos.topk(min(k, len(cos) - 1))
    items = "".join(
        f"<tr><td>feature {i}</td><td>{v:+.3f}</td></tr>"
        for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    )
    parts.append(
        f"<table class=logit><tr><th>nearest features</th><th>cos</th></tr>{items}</table>"
    )
    if model is not None and row.shape[0] == model.cfg.d_model:
        W_out = torch.cat([b.mlp.W_out.detach().float() for b in model.blocks])  # [L*m, d]
        ncos = torch.nn.functional.cosine_similarity(W_out, row[None].to(W_out), dim=-1)
        top = ncos.abs().topk(min(k, len(ncos))).indices.tolist()
        m = model.cfg.d_mlp
        items = "".join(
            f"<tr><td>L{i // m}N{i % m}</td><td>{ncos[i].item():+.3f}</td></tr>" for i in top
        )
        parts.append(
            f"<table class=logit><tr><th>nearest neurons (W_out)</th><th>cos</th></tr>{items}</table>"
        )
        effect = sae.feature(unit, model=model).logit_effect(k=10, model=model)

        def rows(pairs):
            return "".join(f"<tr><td>{_show(t)}</td><td>{v:+.3f}</td></tr>" for t, v in pairs)

        logit = ("<h3>Logit effect</h3><p class=meta>the decoder row W_dec[i] through W_U "
                 "(no final LayerNorm)</p><div class=cols>"
                 f"<table class=logit><tr><th>raised</th><th></th></tr>{rows(effect.top)}</table>"
                 f"<table class=logit><tr><th>lowered</th><th></th></tr>{rows(effect.bottom)}</table></div>")  # fmt: skip
    else:
        logit = ""
    return (f"{logit}<h3>Decoder direction</h3><p class=meta>cosine of W_dec[i] with other "
            f"features' decoder rows and with MLP neurons' write vectors</p>"
            f"<div class=cols>{''.join(parts)}</div>")  # fmt: skip


def _sae_for(site: str, saes: Sequence[SAE]) -> SAE | None:
    """The SAE whose feature activations ``site`` is (``{hook}.sae.hook_acts``)."""
    for sae in saes:
        if site == f"{sae.hook_name}.sae.hook_acts":
            return sae
    return None


# ---- writing ----------------------------------------------------------------------------


def _read(harvest_dir: Path) -> dict:
    """The finished harvest's record (checked by :func:`resid.harvest.store.read_harvest`),
    which must hold statistics."""
    info = store.read_harvest(harvest_dir)
    if not info["site_info"]:
        raise HarvestError(f"{harvest_dir} has no statistics (it was harvested with --no-stats)")
    return info


def check_out(out: str | Path) -> Path:
    """Raise now if ``out`` cannot be written or holds files resid dashboard did not write."""
    return files.check_target(out, WRITER, "--out")


def write_dashboard(
    harvest_dir: str | Path,
    out: str | Path,
    model: Model | None = None,
    sites: str | Sequence[str] | None = None,
    units: str | Sequence[int] | None = None,
    decode: Decode | None = None,
    progress: bool = True,
    saes: Sequence[SAE] = (),
) -> tuple[Path, int]:
    """Write the dashboard of a finished harvest to ``out``; returns ``(out, pages)``.

    ``model`` gives token strings and neurons' logit effects (without one, tokens show
    as ids unless ``decode`` maps ids to strings). For a spliced SAE's feature site
    (``{hook}.sae.hook_acts``), pass the SAE in ``saes``: each feature's page then shows its
    logit effect and the features and neurons nearest its decoder row by cosine. ``sites``/``units`` choose what to page
    (``units="0-99"``); the index lists the same units.

    >>> write_dashboard("harvest", "dash", model=resid.load("gpt2"), units="0-99")
    """
    harvest_dir = Path(harvest_dir)
    info = _read(harvest_dir)
    all_sites = list(info["site_info"])
    if sites is None:
        chosen = all_sites
    else:
        chosen = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else list(sites)
        chosen = list(dict.fromkeys(chosen))  # a site named twice gets one folder
        missing = [s for s in chosen if s not in info["site_info"]]
        if missing:
            raise ValueError(f"the harvest has no statistics for {missing}; it has {all_sites}")
    if decode is None and model is not None:
        decode = model.tokenizer.decode_each
    if decode is None:
        decode = lambda ids: [f"[{i}]" for i in ids]  # noqa: E731
    check_out(out)
    n_pages = 0
    index_rows = []
    slugs = _slugs(chosen)
    with files.replace_folder(out, WRITER, "--out") as tmp:
        for site in chosen:
            st = store.load_stats(harvest_dir, site)
            n_units = st["mean"].shape[0]
            chosen_units = _parse_units(units, n_units)
            folder = tmp / slugs[site]
            folder.mkdir()
            ids = sorted(
                {int(t) for t in st["top_tokens"][chosen_units].unique().tolist() if t >= 0}
            )
            strings = dict(zip(ids, decode(ids), strict=True)) if ids else {}
            for pos, u in enumerate(tqdm(chosen_units, desc=site, unit="unit", file=sys.stderr,
                                         disable=not progress, leave=False)):  # fmt: skip
                prev_u = chosen_units[pos - 1] if pos else None
                next_u = chosen_units[pos + 1] if pos + 1 < len(chosen_units) else None
                page = unit_html(st, site, u, info, strings, model, prev_u, next_u,
                                 _sae_for(site, saes))  # fmt: skip
                (folder / f"{u}.html").write_text(page, encoding="utf-8")
                n_pages += 1
                index_rows.append((site, u, st["max"][u].item(), st["mean"][u].item(),
                                   st["frac_active"][u].item(), f"{slugs[site]}/{u}.html"))  # fmt: skip
        (tmp / "index.html").write_text(index_html(info, index_rows), encoding="utf-8")
    return files.target(out), n_pages


def unit_html(st: dict, site: str, u: int, info: dict, strings: dict[int, str], model,
              prev_u: int | None, next_u: int | None, sae: SAE | None = None) -> str:  # fmt: skip
    """One unit's page (see the module docstring)."""
    count = int(st["count"][0])
    center = int(info.get("window", [12, 4])[0])  # the ranked token's place in its window
    vmax = st["max"][u].item()
    vmin = st["min"][u].item()
    scale = max(abs(vmax), abs(vmin) if vmax <= 0 else 0.0, 1e-12)
    contexts = []
    for j in range(st["top_values"].shape[1]):
        value = st["top_values"][u, j].item()
        if math.isnan(value):
            continue
        toks = [strings.get(int(t)) if int(t) >= 0 else None for t in st["top_tokens"][u, j]]
        contexts.append(context_html(toks, st["top_acts"][u, j].tolist(), center, value, scale))
    nav = ['<a href="../index.html">index</a>']
    if prev_u is not None:
        nav.insert(0, f'<a href="{prev_u}.html">← {prev_u}</a>')
    if next_u is not None:
        nav.append(f'<a href="{next_u}.html">{next_u} →</a>')
    std = math.sqrt(max(st["var"][u].item(), 0.0))
    body = (f'<p>{" · ".join(nav)}</p><h2>{_esc(site)} · unit {u}</h2>'
            f"<p class=meta>{_esc(str(info.get('model', '')))} · {count:,} tokens · max {_fmt(vmax)} · "
            f"min {_fmt(vmin)} · mean {_fmt(st['mean'][u].item())} · std {_fmt(std)} · "
            f"density {st['frac_active'][u].item():.3%} (&gt; {_fmt(float(info.get('active_threshold', 0)))})</p>"
            f"<h3>Activations</h3>{histogram_svg(st['hist'][u], st['edges'])}"
            f"<p class=meta>bins of |x| four to an octave, mirrored below zero; hover a bar for its range</p>"
            f"<h3>Top activating contexts</h3><p class=meta>orange: positive, blue: negative, "
            f"the outlined token is the one ranked; hover a token for its exact activation</p>"
            f"{''.join(contexts) or '<p class=meta>none</p>'}{_logit_html(model, site, u)}"
            f"{_feature_html(model, sae, u)}")  # fmt: skip
    return _page(f"{site} · unit {u}", body)


def index_html(info: dict, rows: list[tuple]) -> str:
    """Every paged unit with max, mean and density; click a column heading to sort."""
    cells = "".join(
        f'<tr><td data-v="{_esc(site)}"><a href="{_esc(href)}">{_esc(site)} · {u}</a></td>'
        f'<td data-v="{u}">{u}</td><td data-v="{vmax!r}">{_fmt(vmax)}</td>'
        f'<td data-v="{mean!r}">{_fmt(mean)}</td><td data-v="{dens!r}">{dens:.3%}</td></tr>'
        for site, u, vmax, mean, dens, href in rows
    )
    head = "".join(f"<th>{h}</th>" for h in ("site · unit", "unit", "max", "mean", "density"))
    body = (f"<h2>resid dashboard</h2><p class=meta>{_esc(str(info.get('model', '')))} on "
            f"{_esc(str(info.get('corpus', '')))} · {int(info.get('tokens', 0)):,} tokens · "
            f"{len(rows)} units · click a heading to sort</p>"
            f"<table class=units><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")  # fmt: skip
    return _page("resid dashboard", body, SORT_JS)
