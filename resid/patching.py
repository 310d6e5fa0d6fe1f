"""Activation patching: run a corrupted prompt, copy in activations from a clean run, and
measure how far a metric moves back.

>>> clean_logits, clean_cache = model.run_with_cache(clean_tokens)
>>> metric = metrics.logit_diff(answer=mary, wrong=john)             # reads 2 logits at pos -1
>>> patch(model, corrupted_tokens, "blocks.3.hook_resid_pre", clean_cache, pos=4, metric=metric)
>>> sweep(model, corrupted_tokens, clean_cache, metric, "resid_pre")  # Sweep [layer, pos]
>>> sweep(model, corrupted_tokens, clean_cache, metric, "z", by_pos=False)  # [layer, head]

A sweep computes only what a patch can change. Patching layer ``l`` at position ``p``
leaves layers before ``l`` and positions before ``p`` as in the corrupted run (attention
is causal), so each cell starts from the corrupted residual at layer ``l``, recomputes only
positions ``p..`` in each later layer, attending over the corrupted run's cached keys and
values for ``0..p-1``, and, when the metric declares what it reads (``metrics.Metric``), ends
with those logits alone. Cells that share ``p`` run together, one batched forward per
chunk, each copy of the corrupted batch joining at its own layer; a cell whose clean and
corrupted activations are equal is the corrupted run, and is not run at all.

``path_patch`` follows Wang et al. (2022); ``attribution_patch`` is the first-order
estimate of a whole sweep from one forward and one backward.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from resid.metrics import Metric, MetricFn
from resid.model import Model

# site -> (hook name within block l, where a patched copy rejoins the forward)
#   "pre": before block l (q/k/v/pattern: with an edit inside its attention),
#   "mid": at resid_mid of block l, "post": after block l.
SITES = {
    "resid_pre": ("hook_resid_pre", "pre"),
    "resid_mid": ("hook_resid_mid", "mid"),
    "resid_post": ("hook_resid_post", "post"),
    "attn_out": ("hook_attn_out", "mid"),
    "mlp_out": ("hook_mlp_out", "post"),
    "z": ("attn.hook_z", "mid"),
    "q": ("attn.hook_q", "pre"),
    "k": ("attn.hook_k", "pre"),
    "v": ("attn.hook_v", "pre"),
    "pattern": ("attn.hook_pattern", "pre"),
}
HEAD_SITES = ("z", "q", "k", "v", "pattern")
Source = Mapping[str, Tensor] | Tensor


def hook_name(site: str, layer: int) -> str:
    """``hook_name("z", 3) == "blocks.3.attn.hook_z"``."""
    return f"blocks.{layer}.{SITES[site][0]}"


def _site(site: str) -> str:
    site = {"out": "z", "head_out": "z"}.get(site, site)
    if site not in SITES:
        raise KeyError(f"no sweep site {site!r}: choose one of {', '.join(SITES)} (or 'out' for z)")
    return site


def _scalar(value, name: str = "metric") -> Tensor:
    out = torch.as_tensor(value)
    if out.dim() != 0:
        raise ValueError(
            f"the {name} returned shape {tuple(out.shape)}, not a scalar: reduce over the batch "
            "(e.g. .mean()) inside the metric"
        )
    return out.detach().float().cpu()


def _as_metric(metric: Metric | MetricFn) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise TypeError(f"metric must be a function of logits or a Metric, not {metric!r}")
    return Metric(metric, pos=None, tokens=None, name=getattr(metric, "__name__", "metric"))


def _check_tokens(model: Model, tokens: Tensor) -> Int[Tensor, "batch pos"]:
    if not isinstance(tokens, Tensor):
        raise TypeError("corrupted input must be token ids [batch, pos]: use model.to_tokens")
    return model.tokens(tokens)


def _clean_acts(
    model: Model, clean: Source, names: list[str], shape: torch.Size
) -> dict[str, Tensor]:
    """The clean activations at ``names``, from a cache or by running clean tokens."""
    if isinstance(clean, Tensor):
        clean = _check_tokens(model, clean)
        if clean.shape != shape:
            raise ValueError(
                f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(shape)} have "
                "different shapes: patching pairs prompts and positions one to one"
            )
        with torch.no_grad():
            _, clean = model.run_with_cache(clean, names_filter=names)
    out = {}
    for name in names:
        if name not in clean:
            raise KeyError(
                f"the clean cache has no '{name}': cache it (run_with_cache names_filter)"
            )
        act = clean[name]
        if act.shape[0] != shape[0] or act.shape[-2 if "pattern" in name else 1] != shape[1]:
            raise ValueError(
                f"clean and corrupted batches have different shapes: clean '{name}' is "
                f"{tuple(act.shape)}, the corrupted tokens {tuple(shape)}; pair them one to one"
            )
        out[name] = act.to(model.device, model.dtype)
    return out


# ---- one patch -----------------------------------------------------------------------


def _axes(name: str) -> tuple[int, int | None]:
    """(position axis, head axis) of the activation at hook ``name``."""
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return 2, 1
    if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")):
        return 1, 2
    return 1, None


def _index_mask(n: int, idx: int | Sequence[int] | None, what: str) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    if idx is None:
        return ~mask
    ids = [idx] if isinstance(idx, int) else list(idx)
    bad = [i for i in ids if not -n <= i < n]
    if bad:
        raise IndexError(f"{what} {bad} out of range: there are {n} ({-n}..{n - 1})")
    mask[ids] = True
    return mask


def patch(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    site: str,
    source: Source,
    *,
    pos: int | Sequence[int] | None = None,
    head: int | Sequence[int] | None = None,
    dims: int | None = None,
    metric: Metric | MetricFn | None = None,
) -> Tensor:
    """Run ``corrupted`` with the activation at hook ``site`` replaced by ``source``'s (a
    cache, or a tensor of the activation's shape), optionally only at positions ``pos``,
    heads ``head`` and the first ``dims`` entries of the last axis. Returns the metric, or
    the logits when no metric is given.

    >>> patch(model, corrupted, "blocks.0.attn.hook_z", clean_cache, pos=-1, head=[2, 5], metric=m)
    """
    tokens = _check_tokens(model, corrupted)
    if site not in model.hook_dict:
        from resid.hooks import unknown_hook_error

        raise unknown_hook_error(site, model.hook_dict)
    pos_axis, head_axis = _axes(site)
    pos_mask = _index_mask(tokens.shape[1], pos, "position")
    if head is not None and head_axis is None:
        raise ValueError(f"'{site}' has no head axis: patch a per-head site (hook_z, hook_q, …)")
    head_mask = _index_mask(model.cfg.n_heads, head, "head")
    src = source[site] if not isinstance(source, Tensor) else source

    def replace(act: Tensor, hook) -> Tensor:
        if src.shape != act.shape:
            raise ValueError(
                f"the source and the corrupted run have different shapes at '{site}': "
                f"{tuple(src.shape)} vs {tuple(act.shape)}; pair prompts and positions one to one"
            )
        mask = torch.ones(act.shape, dtype=torch.bool)
        view = [1] * act.dim()
        view[pos_axis] = -1
        mask &= pos_mask.view(view)
        if head_axis is not None:
            view = [1] * act.dim()
            view[head_axis] = -1
            mask &= head_mask.view(view)
        if dims is not None:
            mask &= _index_mask(act.shape[-1], range(dims), "dims")
        return torch.where(mask.to(act.device), src.to(act), act)

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(site, replace)])
    return logits if metric is None else _scalar(metric(logits))


# ---- the result of a sweep -------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """A metric per patched cell: ``values`` with named ``axes`` (``"layer"``, ``"pos"``,
    ``"head"``), the ``site`` patched, and ``baseline``, the unpatched corrupted metric.

    >>> result.values.shape, result.axes        # torch.Size([12, 16]), ("layer", "pos")
    >>> result.labels("layer")                  # ["L0", "L1", ...]
    """

    values: Tensor
    axes: tuple[str, ...]
    site: str
    baseline: float

    def labels(self, axis: str) -> list[str]:
        prefix = {"layer": "L", "head": "H", "pos": ""}[axis]
        return [f"{prefix}{i}" for i in range(self.values.shape[self.axes.index(axis)])]

    def argmax(self) -> dict[str, int]:
        """The cell with the largest value, by axis name."""
        flat = int(self.values.argmax())
        idx = torch.unravel_index(torch.tensor(flat), self.values.shape)
        return {a: int(i) for a, i in zip(self.axes, idx, strict=True)}

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        return f"Sweep({self.site}: {shape}; baseline={self.baseline:.4g})"


def correlation(a: Sweep | Tensor, b: Sweep | Tensor) -> float:
    """Pearson correlation between the cells of two sweeps (e.g. attribution vs real)."""
    x, y = (t.values if isinstance(t, Sweep) else t for t in (a, b))
    x, y = x.flatten().double(), y.flatten().double()
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


# ---- reading the metric off a batch of patched runs -------------------------------------

_MIN_ROWS = 16


def affine(
    x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "... d_out"]:
    """``x @ W + b`` whose every row is the same however many rows run with it: CPU BLAS
    switches kernels (and rounding) below ~12 rows, so fewer rows are padded up. This is
    what makes a sweep's values independent of its chunk size, bit for bit."""
    rows = x.reshape(-1, W.shape[0])
    n = rows.shape[0]
    if n < _MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(_MIN_ROWS - n, rows.shape[1])])
    out = rows @ W if b is None else torch.addmm(b, rows, W)
    return out[:n].view(*x.shape[:-1], W.shape[1])


class _Readout:
    """Evaluates the metric on ``n`` patched copies of the batch, computing only the logits
    it declares (all of them for a plain function of logits)."""

    def __init__(self, model: Model, metric: Metric, batch: int, n_pos: int):
        self.model, self.metric, self.batch = model, metric, batch
        self.pos = metric.positions(batch, n_pos)
        tokens = metric.token_ids(batch)
        self.W_sel = None if tokens is None else model.W_E[tokens.to(model.device)]  # [b, k, d]
        # causal: positions after the last one read never matter
        self.n_pos = n_pos if self.pos is None else int(self.pos.max()) + 1
        if self.pos is not None:
            self.pos = self.pos.to(model.device)

    def read_rel(self, start: int, n: int) -> Tensor | None:
        """Each row's read position relative to ``start`` (clamped at 0), for ``n`` copies."""
        return None if self.pos is None else (self.pos - start).clamp(min=0).repeat(n)

    def logits(self, x: Float[Tensor, "... d_model"]) -> Tensor:
        ln = self.model.ln_final
        x = F.layer_norm(x, ln.w.shape, ln.w, ln.b, ln.eps)
        if self.W_sel is None:
            return affine(x, self.model.W_U, None)
        x = x.unflatten(0, (-1, self.batch))  # [n, b, (pos,) d]
        W = self.W_sel if x.dim() == 3 else self.W_sel[:, None]  # [b, (1,) k, d]
        return (x[..., None, :] * W).sum(-1).flatten(0, 1)  # a few columns: no GEMM

    def prepare(self, corr_final: Tensor, corr_logits: Tensor | None) -> None:
        """Remember the corrupted run's final residual (and logits): the unpatched rows."""
        self.corr_final = corr_final
        if self.pos is None:
            sel = corr_logits if self.W_sel is None else self.logits(corr_final)
            self.corr_sel = sel
        else:
            self.corr_read = corr_final[torch.arange(self.batch), self.pos]

    def values(self, x: Tensor, start: int, n: int, at_read: bool) -> list[Tensor]:
        """The metric of each of ``n`` copies; ``x`` holds positions ``start..`` of the final
        residual (``[n*b, 1, d]`` already taken at the read positions if ``at_read``)."""
        b = self.batch
        if self.pos is not None:
            rows = x[:, 0] if at_read else x[torch.arange(n * b), self.read_rel(start, n)]
            before = (self.pos < start).repeat(n)
            rows = torch.where(before[:, None], self.corr_read.repeat(n, 1), rows)
            sel = self.logits(rows)
        else:
            sel = torch.cat([self.corr_sel[:, :start].repeat(n, 1, 1), self.logits(x)], 1)
        return [_scalar(self.metric.fn(s)) for s in sel.unflatten(0, (n, b))]

    def baseline(self) -> Tensor:
        if self.pos is not None:
            return _scalar(self.metric.fn(self.logits(self.corr_read)))
        return _scalar(self.metric.fn(self.corr_sel))


# ---- the suffix forward ----------------------------------------------------------------


@dataclass
class _Cell:
    index: tuple[int, ...]  # where its value goes in the result
    layer: int
    mask: Tensor  # which entries it patches: [pos], [pos, head] or [head, pos] (pattern)
    start: int = 0  # first position whose activation the patch changes


class _Engine:
    """Runs patched copies of the corrupted batch from their patch site onwards, on
    positions ``start..`` only, reading earlier positions' keys and values from the cache."""

    def __init__(self, model: Model, site: str, corr: dict, clean: dict, readout: _Readout):
        self.model, self.site, self.corr, self.clean, self.readout = (
            model,
            site,
            corr,
            clean,
            readout,
        )
        self.stage = SITES[site][1]
        cfg = model.cfg
        self.L, self.H, self.E = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.b = readout.batch

    def c(self, site: str, layer: int) -> Tensor:
        return self.corr[hook_name(site, layer)]

    def enter(self, layer: int, cells: list[_Cell], start: int):
        """The joining copies' state at their stage, and the attention edit they need."""
        n, s = len(cells), slice(start, None)
        mask = torch.stack([c.mask for c in cells]).to(self.model.device)
        clean = self.clean[hook_name(self.site, layer)]
        if self.site in HEAD_SITES:
            if self.site == "pattern":
                return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1), (mask[:, :, s], clean)
            m = mask[:, None, s, :, None]  # [n, 1, S, head, 1]
            if self.site != "z":
                return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1), (m, clean[:, s])
            z = torch.where(m, clean[:, s], self.c("z", layer)[:, s]).flatten(0, 1)
            attn = self.model.blocks[layer].attn
            out = affine(z.flatten(-2), attn.W_O.view(-1, attn.W_O.shape[-1]), attn.b_O)
            return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1) + out, None
        m = mask[:, None, s, None]  # [n, 1, S, 1]
        x = torch.where(m, clean[:, s], self.c(self.site, layer)[:, s]).flatten(0, 1)
        if self.site == "attn_out":
            x = self.c("resid_pre", layer)[:, s].repeat(n, 1, 1) + x
        elif self.site == "mlp_out":
            x = self.c("resid_mid", layer)[:, s].repeat(n, 1, 1) + x
        return x, None

    def attention(self, layer, x, start, edit, n_edit, read):
        """resid_pre -> resid_mid of block ``layer`` on positions ``start..``; ``edit`` patches
        q/k/v or the pattern of the last ``n_edit`` rows; ``read`` keeps one query per row."""
        blk = self.model.blocks[layer]
        attn, ln, (N, S, _) = blk.attn, blk.ln1, x.shape
        h = F.layer_norm(x, ln.w.shape, ln.w, ln.b, ln.eps)
        q, k, v = affine(h, attn.W_QKV, attn.b_QKV).view(N, S, 3, self.H, self.E).unbind(2)
        if edit is not None and self.site != "pattern":
            m, clean = edit
            t = {"q": q, "k": k, "v": v}[self.site]
            patched = torch.where(m, clean, t[N - n_edit :].unflatten(0, (-1, self.b)))
            t = torch.cat([t[: N - n_edit], patched.flatten(0, 1)])
            q, k, v = (
                t if name == self.site else a for name, a in zip("qkv", (q, k, v), strict=True)
            )
        if start:
            reps = N // self.b
            k = torch.cat([self.c("k", layer)[:, :start].repeat(reps, 1, 1, 1), k], 1)
            v = torch.cat([self.c("v", layer)[:, :start].repeat(reps, 1, 1, 1), v], 1)
        # rows with a pattern edit build the pattern; all others keep the fused kernel, so a
        # row's numbers never depend on which other rows share its chunk
        e = n_edit if edit is not None and self.site == "pattern" else 0
        head = slice(0, N - e)
        z = self.fused(q[head], k[head], v[head], start, None if read is None else read[head])
        if e:
            tail = slice(N - e, N)
            m, clean = edit
            t = None if read is None else read[tail]
            z = torch.cat([z, self.explicit(q[tail], k[tail], v[tail], start, m, clean, t)])
        if read is not None:  # only the read positions' queries matter
            x = x[torch.arange(N, device=x.device), read][:, None]
        W_O = attn.W_O.view(-1, attn.W_O.shape[-1])
        return x + affine(z.reshape(*z.shape[:2], -1), W_O, attn.b_O)

    def fused(self, q, k, v, start: int, read: Tensor | None) -> Tensor:
        """Causal attention of queries ``start..`` (or one per row at ``read``) through SDPA."""
        qpos = torch.arange(start, start + q.shape[1], device=q.device)
        if read is not None:
            q, qpos = (
                q[torch.arange(len(q), device=q.device), read][:, None],
                (start + read)[:, None],
            )
        allowed = torch.arange(k.shape[1], device=q.device) <= qpos[..., None]  # [(N,) S', T]
        mask = allowed[:, None] if allowed.dim() == 3 else allowed
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2)

    def explicit(self, q, k, v, start: int, m, clean, read: Tensor | None) -> Tensor:
        """Attention with the pattern built, and the patched cells' rows of it replaced."""
        S, T = q.shape[1], k.shape[1]
        qpos = torch.arange(start, start + S, device=q.device)
        allowed = torch.arange(T, device=q.device) <= qpos[:, None]
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(self.E)).masked_fill(
            ~allowed, float("-inf")
        )
        pattern = scores.float().softmax(-1).to(v.dtype).unflatten(0, (-1, self.b))
        m = m[:, None, :, :, None]  # [n, 1, head, S, 1]
        pattern = torch.where(m, clean[:, :, start:, :T], pattern).flatten(0, 1)
        z = (pattern @ vh).transpose(1, 2)  # [N, S, head, d_head]
        return z if read is None else z[torch.arange(len(z), device=z.device), read][:, None]

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        blk = self.model.blocks[layer]
        mlp, ln = blk.mlp, blk.ln2
        h = F.layer_norm(x, ln.w.shape, ln.w, ln.b, ln.eps)
        post = F.gelu(affine(h, mlp.W_in, mlp.b_in), approximate=mlp.approximate)
        return x + affine(post, mlp.W_out, mlp.b_out)

    def run(self, cells: list[_Cell], start: int) -> dict[int, Tensor]:
        """The metric of each cell (all sharing ``start``; by ``id``), in one batched pass.

        The running copies ``x`` enter each block at resid_pre; a cell's copy joins them at
        its own layer, before the block, at resid_mid or after it (its ``stage``). In the
        last block, a metric that reads one position per prompt needs only that query."""
        order: list[_Cell] = []
        x = None
        for layer in range(min(c.layer for c in cells), self.L):
            joining = [c for c in cells if c.layer == layer]
            stage, state, edit = None, None, None
            if joining:
                stage, (state, edit) = self.stage, self.enter(layer, joining, start)
            read = None
            if layer == self.L - 1 and self.readout.pos is not None:
                read = partial(self.readout.read_rel, start)
                if stage in ("mid", "post"):
                    state = state[torch.arange(len(state)), read(len(joining))][:, None]
            if stage == "pre":
                x = _cat(x, state)
            if x is not None:
                n_edit = len(state) if stage == "pre" else 0
                rows = None if read is None else read(len(x) // self.b)
                x = self.attention(layer, x, start, edit, n_edit, rows)
            if stage == "mid":
                x = _cat(x, state)
            if x is not None:
                x = self.mlp(layer, x)
            if stage == "post":
                x = _cat(x, state)
            order += joining
        values = self.readout.values(x, start, len(order), self.readout.pos is not None)
        return {id(c): v for c, v in zip(order, values, strict=True)}


def _cat(x: Tensor | None, more: Tensor) -> Tensor:
    return more if x is None else torch.cat([x, more])


# ---- sweeps --------------------------------------------------------------------------


def _cells(site: str, by_pos: bool, L: int, T: int, H: int) -> tuple[tuple[str, ...], list]:
    if site not in HEAD_SITES:
        axes = ("layer", "pos")
    elif site == "pattern":
        axes = ("layer", "head", "pos") if by_pos else ("layer", "head")
    else:
        axes = ("layer", "pos", "head") if by_pos else ("layer", "head")
    sizes = {"layer": L, "pos": T, "head": H}
    cells = []
    for index in itertools.product(*(range(sizes[a]) for a in axes)):
        at = dict(zip(axes, index, strict=True))
        pos = _index_mask(T, at.get("pos"), "position")
        if site not in HEAD_SITES:
            mask = pos
        else:
            head = _index_mask(H, at["head"], "head")
            mask = pos[None] & head[:, None] if site == "pattern" else pos[:, None] & head[None]
        cells.append(_Cell(index, at["layer"], mask))
    return axes, cells


def _differs(site: str, clean: Tensor, corr: Tensor) -> Tensor:
    """Where clean and corrupted activations differ, shaped like a cell's mask."""
    diff = clean != corr
    return diff.any(0).any(-1)  # [pos], [pos, head] or [head, pos]


def sweep(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: Source,
    metric: Metric | MetricFn,
    site: str = "resid_pre",
    *,
    by_pos: bool = True,
    chunk_cells: int | None = None,
    max_memory: float = 1e9,
    progress: bool = True,
) -> Sweep:
    """Patch every cell of ``site`` (every layer × position, or × head) from ``clean`` (a
    cache or clean tokens) into the corrupted run, one metric per cell.

    Sites: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` ->
    ``[layer, pos]``; heads ``z`` (alias ``out``), ``q``, ``k``, ``v`` -> ``[layer, pos,
    head]`` (``[layer, head]`` with ``by_pos=False``: all positions at once); ``pattern`` ->
    ``[layer, head, pos]`` (destination position) or ``[layer, head]``. Axes match
    TransformerLens' ``patching.get_act_patch_*``. ``chunk_cells`` cells run per batched
    forward (default: as many as fit in ``max_memory`` bytes).

    >>> result = sweep(model, corrupted, clean_cache, metrics.logit_diff(a, w), "resid_pre")
    >>> result.values.shape                      # [n_layers, pos]
    """
    site = _site(site)
    tokens = _check_tokens(model, corrupted)
    metric = _as_metric(metric)
    cfg, (b, T) = model.cfg, tokens.shape
    readout = _Readout(model, metric, b, T)
    Te = readout.n_pos
    names = [hook_name(site, layer) for layer in range(cfg.n_layers)]
    clean_acts = _clean_acts(model, clean, names, tokens.shape)
    corr_names = {
        hook_name(s, layer) for layer in range(cfg.n_layers) for s in ("resid_pre", "k", "v")
    }
    corr_names |= {hook_name("resid_mid", layer) for layer in range(cfg.n_layers)}
    corr_names |= set(names) | {hook_name("resid_post", cfg.n_layers - 1)}
    with torch.no_grad():
        corr_logits, corr = model.run_with_cache(tokens[:, :Te], names_filter=sorted(corr_names))
        corr = dict(corr.items())
        for name in names:
            a = clean_acts[name]
            clean_acts[name] = a[:, :, :Te, :Te] if site == "pattern" else a[:, :Te]
        readout.prepare(corr[hook_name("resid_post", cfg.n_layers - 1)], corr_logits)
        baseline = readout.baseline()

        axes, cells = _cells(site, by_pos, cfg.n_layers, T, cfg.n_heads)
        differs = [_differs(site, clean_acts[n], corr[n]).cpu() for n in names]
        values = torch.full(_sizes(axes, cfg, T), float(baseline))
        groups: dict[int, list[_Cell]] = {}
        for cell in cells:
            m = cell.mask[:, :Te] if site == "pattern" else cell.mask[:Te]
            changed = m & differs[cell.layer]
            positions = changed.nonzero()[:, 1 if site == "pattern" else 0]
            if len(positions):  # otherwise the patch changes nothing: the corrupted run
                cell.mask, cell.start = m, int(positions.min())
                groups.setdefault(cell.start, []).append(cell)
        engine = _Engine(model, site, corr, clean_acts, readout)
        per_cell = b * Te * (8 * cfg.d_model + 2 * cfg.d_mlp + 3 * cfg.n_heads * Te)
        if readout.pos is None:
            per_cell += b * Te * (cfg.d_vocab if readout.W_sel is None else readout.W_sel.shape[1])
        chunk = chunk_cells or max(1, int(max_memory // (per_cell * model.W_E.element_size())))
        bar = tqdm(total=len(cells), desc=f"patching {site}", disable=not progress)
        bar.update(len(cells) - sum(map(len, groups.values())))
        for start, group in sorted(groups.items()):
            group.sort(key=lambda c: c.layer)
            for i in range(0, len(group), chunk):
                part = group[i : i + chunk]
                out = engine.run(part, start)
                for c in part:
                    values[c.index] = out[id(c)]
                bar.update(len(part))
        bar.close()
    return Sweep(values, axes, site, float(baseline))


def _sizes(axes: tuple[str, ...], cfg, T: int) -> list[int]:
    return [{"layer": cfg.n_layers, "pos": T, "head": cfg.n_heads}[a] for a in axes]


# ---- attribution patching ------------------------------------------------------------


def attribution_patch(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: Source,
    metric: Metric | MetricFn,
    site: str = "resid_pre",
    *,
    by_pos: bool = True,
) -> Sweep:
    """The first-order estimate of ``sweep(...)``: for every cell, the corrupted metric plus
    ``grad · (clean - corrupted)`` summed over the cell's entries, from one forward and one
    backward of the corrupted run. ``site`` is a sweep site or any ``[batch, pos, ...]``
    hook name (then one cell per position).

    >>> est = attribution_patch(model, corrupted, clean_cache, metric, "resid_pre")
    >>> correlation(est, sweep(model, corrupted, clean_cache, metric, "resid_pre"))
    """
    tokens = _check_tokens(model, corrupted)
    metric = _as_metric(metric)
    L = model.cfg.n_layers
    if site in model.hook_dict:
        names, axes = [site], ("pos",)
    else:
        site = _site(site)
        names = [hook_name(site, layer) for layer in range(L)]
        axes, _ = _cells(site, by_pos, 1, 1, 1)
    clean_acts = _clean_acts(model, clean, names, tokens.shape)
    acts, deltas = {}, {}

    def nudge(act: Tensor, hook) -> Tensor:  # d metric / d delta = d metric / d act
        acts[hook.name] = act.detach()
        deltas[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + deltas[hook.name]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, nudge) for n in names])
        value = torch.as_tensor(metric(logits))
        baseline = _scalar(value)
        grads = torch.autograd.grad(value, [deltas[n] for n in names], allow_unused=True)
    per_layer = []
    for name, grad in zip(names, grads, strict=True):
        grad = torch.zeros_like(acts[name]) if grad is None else grad
        prod = (grad * (clean_acts[name] - acts[name])).float()
        if name.endswith("hook_pattern"):  # [b, head, dest, src] -> [head, dest]
            est = prod.sum((0, 3))
            est = est if by_pos else est.sum(1)
        elif _axes(name)[1] is not None:  # [b, pos, head, e] -> [pos, head]
            est = prod.sum((0, 3))
            est = est if by_pos else est.sum(0)
        else:  # [b, pos, ...] -> [pos]
            est = prod.sum(0).flatten(1).sum(1)
        per_layer.append(est)
    values = per_layer[0] if axes == ("pos",) else torch.stack(per_layer)
    return Sweep(values.cpu() + baseline, axes, site, float(baseline))


# ---- path patching ---------------------------------------------------------------------

Head = tuple[int, int]


def _head_masks(model: Model, heads: Sequence[Head], what: str) -> Tensor:
    """``[n_layers, n_heads]`` bools for a list of ``(layer, head)``."""
    cfg = model.cfg
    mask = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise IndexError(
                f"{what} head ({layer}, {head}) out of range: the model has {cfg.n_layers} "
                f"layers × {cfg.n_heads} heads"
            )
        mask[layer, head] = True
    return mask.to(model.device)


def _path_values(
    model: Model,
    tokens: Tensor,
    clean: dict,
    corr: dict,
    readout: _Readout,
    senders: Tensor,  # [n, layer, head]
    receivers: Tensor | None,  # [layer, head]; None: the logits (final residual)
    inputs: str,
    freeze_mlps: bool,
) -> list[Tensor]:
    """The metric for each of ``n`` sender sets, as one batched pair of forwards."""
    n, L = senders.shape[0], model.cfg.n_layers
    rep = lambda t: t.repeat(n, *[1] * (t.dim() - 1))  # noqa: E731
    first = int(senders.any(0).any(1).nonzero().min())
    stop = L if receivers is None else int(receivers.any(1).nonzero().max()) + 1
    captured: dict[str, Tensor] = {}

    def freeze(layer: int):
        m = senders[:, layer][:, None, None, :, None]  # [n, 1, 1, head, 1]
        z = torch.where(m, clean[hook_name("z", layer)], corr[hook_name("z", layer)])
        return lambda act, hook: z.flatten(0, 1)

    hooks = [(hook_name("z", layer), freeze(layer)) for layer in range(first, stop)]
    if freeze_mlps:
        hooks += [
            (hook_name("mlp_out", layer), lambda act, hook: rep(corr[hook.name]))
            for layer in range(first, stop)
        ]
    if receivers is not None:
        for layer in range(first, stop):
            if receivers[layer].any():
                for s in inputs:
                    hooks.append(
                        (hook_name(s, layer), lambda a, hook: captured.update({hook.name: a}))
                    )
    with model.hooks(hooks):
        final = model(
            rep(corr[hook_name("resid_pre", first)]), start_at_layer=first, stop_at_layer=stop
        )
    if receivers is not None:
        low = int(receivers.any(1).nonzero().min())
        hooks = []
        for name, act in captured.items():
            layer = int(name.split(".")[1])
            m = receivers[layer][None, None, :, None]
            hooks.append((name, lambda a, hook, new=act, m=m: torch.where(m, new, a)))
        with model.hooks(hooks):
            final = model(
                rep(corr[hook_name("resid_pre", low)]), start_at_layer=low, stop_at_layer=L
            )
    return readout.values(final, 0, n, at_read=False)


def _path_setup(model, corrupted, clean, metric, receivers, inputs):
    tokens = _check_tokens(model, corrupted)
    metric = _as_metric(metric)
    L = model.cfg.n_layers
    if receivers != "logits" and (not inputs or set(inputs) - set("qkv")):
        raise ValueError(f"receiver_input must be letters of 'qkv', not {inputs!r}")
    recv = None if receivers == "logits" else _head_masks(model, receivers, "receiver")
    if recv is not None and not recv.any():
        raise ValueError("give at least one receiver head, or receivers='logits'")
    names = [hook_name(s, layer) for layer in range(L) for s in ("z", "mlp_out")]
    clean_acts = _clean_acts(
        model, clean, [hook_name("z", layer) for layer in range(L)], tokens.shape
    )
    readout = _Readout(model, metric, *tokens.shape)
    with torch.no_grad():
        names += [hook_name("resid_pre", layer) for layer in range(L)]
        names.append(hook_name("resid_post", L - 1))
        logits, corr = model.run_with_cache(tokens, names_filter=names)
    readout.prepare(corr[hook_name("resid_post", L - 1)], logits)
    return tokens, dict(corr.items()), clean_acts, readout, recv


def path_patch(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: Source,
    metric: Metric | MetricFn,
    senders: Sequence[Head],
    receivers: Sequence[Head] | str = "logits",
    receiver_input: str = "qkv",
    *,
    freeze_mlps: bool = False,
) -> Tensor:
    """The effect of ``senders``' clean outputs on the corrupted run *through* the
    ``receiver_input`` (letters of ``"qkv"``) of the ``receivers`` only (Wang et al. 2022).

    1. Run corrupted with the senders' ``z`` from clean and every other head's ``z``
       frozen at its corrupted value (MLPs recomputed, as in the IOI paper, unless
       ``freeze_mlps``); keep the receivers' q/k/v.
    2. Run corrupted with only the receivers' q/k/v replaced by those; return the metric.
       With ``receivers="logits"`` the metric is read off step 1 (the direct path).

    To measure how much breaking a path hurts the clean run, as in the paper, pass the
    clean tokens as ``corrupted`` and the corrupted cache as ``clean``.

    >>> path_patch(model, corr, clean_cache, m, senders=[(9, 6), (9, 9)], receivers="logits")
    >>> path_patch(model, corr, clean_cache, m, senders=[(3, 0)], receivers=[(8, 6)], receiver_input="v")
    """
    tokens, corr, clean_acts, readout, recv = _path_setup(
        model, corrupted, clean, metric, receivers, receiver_input
    )
    send = _head_masks(model, senders, "sender")
    if not send.any():
        return readout.baseline()
    with torch.no_grad():
        args = (tokens, clean_acts, corr, readout, send[None], recv, receiver_input, freeze_mlps)
        return _path_values(model, *args)[0]


def path_patch_sweep(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: Source,
    metric: Metric | MetricFn,
    receivers: Sequence[Head] | str = "logits",
    receiver_input: str = "qkv",
    *,
    freeze_mlps: bool = False,
    chunk_cells: int = 16,
    progress: bool = True,
) -> Sweep:
    """``path_patch`` with each head alone as the sender: a ``[layer, head]`` Sweep. Heads
    that cannot reach a receiver (at or after its layer) get the corrupted metric.

    >>> path_patch_sweep(model, corr, clean_cache, m, receivers=[(8, 6), (8, 10)], receiver_input="v")
    """
    tokens, corr, clean_acts, readout, recv = _path_setup(
        model, corrupted, clean, metric, receivers, receiver_input
    )
    cfg = model.cfg
    baseline = readout.baseline()
    values = torch.full((cfg.n_layers, cfg.n_heads), float(baseline))
    last = cfg.n_layers if recv is None else int(recv.any(1).nonzero().max())
    cells = [(layer, head) for layer in range(last) for head in range(cfg.n_heads)]
    with torch.no_grad():
        for i in tqdm(
            range(0, len(cells), chunk_cells), disable=not progress, desc="path patching"
        ):
            part = cells[i : i + chunk_cells]
            send = torch.stack([_head_masks(model, [c], "sender") for c in part])
            args = (tokens, clean_acts, corr, readout, send, recv, receiver_input, freeze_mlps)
            for c, v in zip(part, _path_values(model, *args), strict=True):
                values[c] = v
    return Sweep(values, ("layer", "head"), f"path {receiver_input}", float(baseline))
