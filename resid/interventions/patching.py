"""Activation patching: run a corrupted prompt, copy in activations from a clean run, and
measure how far a metric moves back.

>>> clean_logits, clean_cache = model.run_with_cache(clean_tokens)
>>> metric = metrics.logit_diff(answer=mary, wrong=john)             # reads 2 logits at pos -1
>>> patch(model, corrupted_tokens, "blocks.3.hook_resid_pre", clean_cache, pos=4, metric=metric)
>>> sweep(model, corrupted_tokens, clean_cache, metric, "resid_pre")  # Sweep [layer, pos]
>>> sweep(model, corrupted_tokens, clean_cache, metric, "z", by_pos=False)  # [layer, head]

A sweep computes only what a patch can change (``resid.interventions.engine`` runs it): each cell starts
at its own layer from the corrupted residual stream, recomputes only the positions from the
patched one on, and reads only the logits a declared metric (``metrics.Metric``) needs.
Cells that share a position run together, one batched forward per chunk; a cell whose clean
and corrupted activations are equal is the corrupted run, and is not run at all.

``attribution_patch`` is the first-order estimate of a whole sweep from one forward and
one backward; path patching (Wang et al. 2022) is in ``resid.interventions.path_patching``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm

from resid.core import names as site_names
from resid.core.hooks import unknown_hook_error
from resid.core.inputs import Inputs, check_mask, check_tokens, prepare
from resid.core.labelled import Labelled, correlation  # noqa: F401 - resid.patching.correlation
from resid.core.model import Model
from resid.interventions.engine import HEAD_SITES, SITES, Cell, Engine, Readout, hook_name, scalar
from resid.interventions.metrics import Metric, MetricFn, as_metric

Source = Mapping[str, Tensor] | Tensor


def _site(site: str) -> str:
    site = {"out": "z", "head_out": "z"}.get(site, site)
    if site not in SITES:
        raise KeyError(f"no sweep site {site!r}: choose one of {', '.join(SITES)} (or 'out' for z)")
    return site


def _prepare(model: Model, tokens: Tensor | Inputs, attention_mask: Tensor | None) -> Inputs:
    """The corrupted run's token ids and mask, checked once for the whole call."""
    if not isinstance(tokens, Tensor):
        raise TypeError("corrupted input must be token ids [batch, pos]: use model.to_tokens")
    return prepare(model, tokens, attention_mask)


def _clean_acts(
    model: Model, clean: Source, names: list[str], shape: torch.Size, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """The clean activations at ``names``, from a cache or by running clean tokens (with
    the corrupted run's attention mask: patching pairs positions one to one)."""
    if isinstance(clean, Tensor):
        clean = check_tokens(model, clean)
        if clean.shape != shape:
            raise ValueError(
                f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(shape)} have "
                "different shapes: patching pairs prompts and positions one to one"
            )
        with torch.no_grad():
            _, clean = model.run_with_cache(Inputs(clean, mask), names_filter=names)
    out = {}
    for name in names:
        if name not in clean:
            raise KeyError(
                f"the clean cache has no '{name}': cache it (run_with_cache names_filter)"
            )
        act = clean[name]
        site = site_names.info(name)
        pos_axis = 1 if site is None else site.pos_axis
        if act.shape[0] != shape[0] or act.shape[pos_axis] != shape[1]:
            raise ValueError(
                f"clean and corrupted batches have different shapes: clean '{name}' is "
                f"{tuple(act.shape)}, the corrupted tokens {tuple(shape)}; pair them one to one"
            )
        fp32 = site is not None and site.fp32  # scores, patterns, scales: fp32 in every model
        out[name] = act.to(model.device, torch.float32 if fp32 else model.dtype)
    return out


# ---- one patch -----------------------------------------------------------------------


def _axes(name: str) -> tuple[int, int | None]:
    """(position axis, head axis) of the activation at hook ``name`` (from the table of
    sites; a site it does not describe, such as a spliced SAE's, is ``[batch, pos, ...]``)."""
    site = site_names.info(name)
    return (1, None) if site is None else (site.pos_axis, site.head_axis)


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
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Run ``corrupted`` with the activation at hook ``site`` replaced by ``source``'s (a
    cache, or a tensor of the activation's shape), optionally only at positions ``pos``,
    heads ``head`` and the first ``dims`` entries of the last axis. Returns the metric, or
    the logits when no metric is given. Hooks attached around it apply too.

    >>> patch(model, corrupted, "blocks.0.attn.hook_z", clean_cache, pos=-1, head=[2, 5], metric=m)
    """
    tokens, mask = batch = _prepare(model, corrupted, attention_mask)
    if site not in model.hook_dict:
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
        logits = model.run_with_hooks(batch, fwd_hooks=[(site, replace)])
    return logits if metric is None else evaluate(as_metric(metric), logits, mask)


# ---- the result of a sweep -------------------------------------------------------------


Sweep = Labelled  # a sweep is a Labelled result: values [layer, pos(, head)], site, baseline


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
        cells.append(Cell(index, at["layer"], mask))
    return axes, cells


def _differs(site: str, clean: Tensor, corr: Tensor) -> Tensor:
    """Where clean and corrupted activations differ, shaped like a cell's mask."""
    diff = clean.to(corr.device) != corr  # blocks on several devices: corr is on its block's
    return diff.any(0).any(-1)  # [pos], [pos, head] or [head, pos]


def sweep(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: Source,
    metric: Metric | MetricFn,
    site: str = "resid_pre",
    *,
    by_pos: bool = True,
    attention_mask: Tensor | None = None,
    chunk_cells: int | None = None,
    max_memory: float = 1e9,
    progress: bool = True,
) -> Labelled:
    """Patch every cell of ``site`` (every layer × position, or × head) from ``clean`` (a
    cache or clean tokens) into the corrupted run, one metric per cell.

    Sites: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` ->
    ``[layer, pos]``; heads ``z`` (alias ``out``), ``q``, ``k``, ``v`` -> ``[layer, pos,
    head]`` (``[layer, head]`` with ``by_pos=False``: all positions at once); ``pattern`` ->
    ``[layer, head, pos]`` (destination position) or ``[layer, head]``. Axes match
    TransformerLens' ``patching.get_act_patch_*``. ``chunk_cells`` cells run per batched
    forward (default: as many as fit in ``max_memory`` bytes). ``attention_mask`` marks the
    real tokens of a padded batch (a declared metric's ``pos=-1`` is then each row's last
    real token).

    Hooks the caller attached around the sweep (``with model.hooks(...)``) apply to every
    run, as to a one-forward-per-cell loop; the sweep then runs exactly that loop (one full
    forward per cell that can change anything), since the batched engine's forwards cover
    only part of each run.

    >>> result = sweep(model, corrupted, clean_cache, metrics.logit_diff(a, w), "resid_pre")
    >>> result.values.shape                      # [n_layers, pos]
    """
    site = _site(site)
    tokens, mask = _prepare(model, corrupted, attention_mask)
    metric = as_metric(metric)
    cfg, (b, T) = model.cfg, tokens.shape
    # a parallel block has no resid_mid at which the batched engine could join a copy: its
    # attention and MLP outputs are patched by a plain forward per cell instead
    plain = cfg.parallel_attn_mlp and (SITES[site][1] == "mid" or site == "mlp_out")
    enclosing = plain or bool(model.attached_hooks())
    readout = Readout(model, metric, b, T, mask)
    if enclosing:
        readout.n_pos = T
    Te = readout.n_pos
    names = [hook_name(site, layer) for layer in range(cfg.n_layers)]
    clean_acts = _clean_acts(model, clean, names, tokens.shape, mask)
    k = "rot_k" if cfg.positional == "rotary" else "k"  # the keys attention reads
    corr_names = {
        hook_name(s, layer) for layer in range(cfg.n_layers) for s in ("resid_pre", k, "v")
    }
    if not cfg.parallel_attn_mlp:
        corr_names |= {hook_name("resid_mid", layer) for layer in range(cfg.n_layers)}
    corr_names |= set(names) | {hook_name("resid_post", cfg.n_layers - 1)}
    with torch.no_grad():
        # the positions the metric can see (a narrower mask may have no padding left)
        narrow = (
            mask if mask is None or Te == T else check_mask(mask[:, :Te], (b, Te), model.device)
        )
        head = Inputs(tokens[:, :Te], narrow)
        corr_logits, corr = model.run_with_cache(head, names_filter=sorted(corr_names))
        corr = dict(corr.items())
        for name in names:
            a = clean_acts[name]
            clean_acts[name] = a[:, :, :Te, :Te] if site == "pattern" else a[:, :Te]
        final = corr[hook_name("resid_post", cfg.n_layers - 1)].to(model.device)
        readout.prepare(final, corr_logits)
        # under enclosing hooks every value is a plain forward's metric, the baseline too
        baseline = evaluate(metric, corr_logits, mask) if enclosing else readout.baseline()

        H = cfg.kv_heads if site in ("k", "v") else cfg.n_heads
        axes, cells = _cells(site, by_pos, cfg.n_layers, T, H)
        differs = [_differs(site, clean_acts[n], corr[n]).cpu() for n in names]
        values = torch.full(_sizes(axes, cfg.n_layers, T, H), float(baseline))
        groups: dict[int, list[Cell]] = {}
        for cell in cells:
            m = cell.mask[:, :Te] if site == "pattern" else cell.mask[:Te]
            changed = m & differs[cell.layer]
            positions = changed.nonzero()[:, 1 if site == "pattern" else 0]
            if len(positions):  # otherwise the patch changes nothing: the corrupted run
                cell.mask, cell.start = m, int(positions.min())
                groups.setdefault(cell.start, []).append(cell)
        if enclosing:
            for cell in (c for group in groups.values() for c in group):
                values[cell.index] = _one_forward(
                    model, tokens, mask, site, cell, clean_acts, metric
                )
            return Labelled(values, axes, site=site, baseline=float(baseline))
        engine = Engine(model, site, corr, clean_acts, readout, mask)
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
    return Labelled(values, axes, site=site, baseline=float(baseline))


def _one_forward(model, tokens, mask, site: str, cell: Cell, clean_acts: dict, metric) -> Tensor:
    """One cell as a plain forward with a patching hook (under whatever hooks the caller
    attached): the reference the batched engine reproduces."""
    name = hook_name(site, cell.layer)
    m = cell.mask.to(model.device)
    if site == "pattern":
        m = m[None, :, :, None]  # [1, head, dest, 1]
    elif site in HEAD_SITES:
        m = m[None, :, :, None]  # [1, pos, head, 1]
    else:
        m = m[None, :, None]  # [1, pos, 1]
    clean = clean_acts[name]

    def replace(act: Tensor, hook) -> Tensor:
        return torch.where(m.to(act.device), clean.to(act), act)

    logits = model.run_with_hooks(Inputs(tokens, mask), fwd_hooks=[(name, replace)])
    return evaluate(metric, logits, mask)


def evaluate(metric: Metric, logits: Tensor, mask: Tensor | None) -> Tensor:
    """The metric of a run's logits, as a float scalar; a declared metric reads each row's
    real positions under ``mask``."""
    return scalar(metric(logits, attention_mask=mask))


def _sizes(axes: tuple[str, ...], L: int, T: int, H: int) -> list[int]:
    return [{"layer": L, "pos": T, "head": H}[a] for a in axes]


# ---- attribution patching ------------------------------------------------------------


def attribution_patch(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: Source,
    metric: Metric | MetricFn,
    site: str = "resid_pre",
    *,
    by_pos: bool = True,
    attention_mask: Tensor | None = None,
) -> Labelled:
    """The first-order estimate of ``sweep(...)``: for every cell, the corrupted metric plus
    ``grad · (clean - corrupted)`` summed over the cell's entries, from one forward and one
    backward of the corrupted run (under any hooks attached around it). ``site`` is a sweep
    site (``[layer, ...]`` out) or any hook name: ``[pos]`` for the stream's sites,
    ``[pos, head]`` for per-head ones, ``[head, pos]`` for the pattern (``by_pos=False``
    sums the positions).

    >>> est = attribution_patch(model, corrupted, clean_cache, metric, "resid_pre")
    >>> correlation(est, sweep(model, corrupted, clean_cache, metric, "resid_pre"))
    """
    tokens, mask = _prepare(model, corrupted, attention_mask)
    metric = as_metric(metric)
    L = model.cfg.n_layers
    if site in model.hook_dict:
        names, axes = [site], _hook_axes(site, by_pos)
    else:
        site = _site(site)
        names = [hook_name(site, layer) for layer in range(L)]
        axes = ("layer", *_hook_axes(names[0], by_pos))
    clean_acts = _clean_acts(model, clean, names, tokens.shape, mask)
    baseline, acts, grads = metric_gradients(model, tokens, mask, metric, names)
    per_layer = []
    for name, grad in zip(names, grads, strict=True):
        prod = (grad * (clean_acts[name].to(grad) - acts[name])).float()
        if not _per_token(name):  # [b, head, dest, src] -> [head, dest]
            est = prod.sum((0, 3))
            est = est if by_pos else est.sum(1)
        elif _axes(name)[1] is not None:  # [b, pos, head, e] -> [pos, head]
            est = prod.sum((0, 3))
            est = est if by_pos else est.sum(0)
        else:  # [b, pos, ...] -> [pos]
            est = prod.sum(0).flatten(1).sum(1)
            est = est if by_pos else est.sum(0)
        per_layer.append(est.cpu())  # blocks on several devices: gathered on the CPU
    values = per_layer[0] if axes[0] != "layer" else torch.stack(per_layer)
    return Labelled(values.cpu() + baseline, axes, site=site, baseline=float(baseline))


def metric_gradients(
    model: Model, tokens: Tensor, mask: Tensor | None, metric: Metric, names: list[str]
) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
    """One forward and one backward of ``tokens`` (under any hooks attached around it): the
    metric, the activation at each of ``names``, and the metric's gradient there (zeros
    where it does not reach). Each site gets a zero ``delta`` added, whose gradient is the
    activation's; the model's parameters get no ``.grad``. ``tokens`` and ``mask`` are
    taken as checked (``model.prepare``) and not checked again."""
    acts, deltas = {}, {}

    def nudge(act: Tensor, hook) -> Tensor:  # d metric / d delta = d metric / d act
        acts[hook.name] = act.detach()
        deltas[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + deltas[hook.name]

    with torch.enable_grad():  # tokens and mask were checked by the caller
        logits = model.run_with_hooks(Inputs(tokens, mask), fwd_hooks=[(n, nudge) for n in names])
        value = torch.as_tensor(metric(logits, attention_mask=mask))
        grads = torch.autograd.grad(value, [deltas[n] for n in names], allow_unused=True)
    grads = [
        torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads, strict=True)
    ]
    return scalar(value), acts, grads


def _per_token(name: str) -> bool:
    """One vector per token at ``name`` (not ``[query, key]`` pairs, as a pattern is)."""
    site = site_names.info(name)
    return site is None or site.per_token


def _hook_axes(name: str, by_pos: bool) -> tuple[str, ...]:
    """The axes ``attribution_patch`` gives one hook's estimate."""
    if not _per_token(name):
        return ("head", "pos") if by_pos else ("head",)
    if _axes(name)[1] is not None:
        return ("pos", "head") if by_pos else ("head",)
    return ("pos",) if by_pos else ()


# ---- path patching ---------------------------------------------------------------------
