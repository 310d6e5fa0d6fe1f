"""Feature circuits: what each SAE feature does to the output, and to a metric.

- :func:`direct_feature_attribution` splits the logit (difference) into each active
  feature's direct part, through ``ln_final`` exactly as the model's own direct logit
  attribution does (``resid.core.lens``): the parts sum to the logit.
- :func:`attribute_features`: attribution patching over every feature at once (one
  forward, one backward).
- :func:`patch_features`: real patching, one feature at a time, run by the patching
  engine (``resid.interventions.engine``) from the SAE's layer on.
- :func:`feature_circuit`: both, and how well they agree.

>>> with model.saes([sae]):
...     _, clean_cache = model.run_with_cache(clean)
...     circuit = feature_circuit(model, corrupted, clean_cache, metric, [sae], k=10)
>>> circuit.correlation, circuit.table()[:3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from resid.core.cache import ActivationCache
from resid.core.decompose import contributions
from resid.core.labelled import Labelled, correlation
from resid.core.lens import final_scale, logit_attribution, readout_direction, unembed_direction
from resid.core.model import Model
from resid.core.names import act_name, layer_of, stream_site
from resid.interventions.engine import SITES, Cell, Engine, Readout, scalar
from resid.interventions.metrics import Metric, MetricFn, as_metric
from resid.interventions.patching import metric_gradients
from resid.sae.features import Dictionary

Target = int | str | tuple | Tensor


# ---- direct feature attribution ---------------------------------------------------------


def direct_feature_attribution(
    sae: Dictionary, cache: ActivationCache, target: Target, heads: bool = True
) -> Labelled:
    """Direct feature attribution: each active feature's write vector times its
    activation, through ``ln_final`` as the model applies it (divided by the final scale,
    times the gain, and centred only where the norm centres: LayerNorm, not RMSNorm), onto
    ``target`` (a token, a pair ``(a, b)`` for a logit difference, or a direction),
    ``[component, batch, pos]``. The direction is the model's own attribution's
    (``resid.core.lens.readout_direction``).

    Parts: ``F{i}`` for each feature active somewhere in the batch, ``sae.b_dec``,
    ``sae.norm_mean`` (a ``layer_norm``-normalising SAE's re-added mean), ``sae.error``
    (when spliced with the error term), then every later part of the final stream (heads,
    MLPs, …) and ``ln_final.b`` where the norm has one: they sum to the logit (difference)
    at every position. For an SAE on the residual stream; the cache must come from a run
    with the SAE spliced, holding its ``hook_acts``, ``hook_error`` (and ``hook_input`` for
    a normalising SAE) and what ``logit_attribution`` needs.

    >>> with model.saes([sae]):
    ...     _, cache = model.run_with_cache(tokens)
    >>> dfa = direct_feature_attribution(sae, cache, (" Mary", " John"))
    >>> dfa.top(5, pos=-1)
    """
    model = cache.model
    site = stream_site(sae.hook_name)
    if site is None:
        raise ValueError(
            f"direct feature attribution needs an SAE on the residual stream, not "
            f"'{sae.hook_name}': its writes reach the logits only through later layers"
        )
    acts_name = sae.name_of("hook_acts")
    needed = [acts_name]
    if sae.normalises:
        needed.append(sae.name_of("hook_input"))
    cache.require(needed, "direct feature attribution", f"[..., {needed!r}] with the SAE spliced")
    acts = cache[acts_name]
    ref = acts
    u = unembed_direction(model, target, acts.shape[0]).to(ref)
    direction = readout_direction(model, u)  # [batch, d_model]
    scale = final_scale(cache)[..., 0].to(ref)  # [batch, pos]
    stats = sae.stats(cache[needed[1]]) if len(needed) > 1 else None
    out_scale = stats[1][..., 0].to(ref) if stats is not None else torch.ones_like(scale)
    with torch.no_grad():
        W = sae.write_matrix().detach().to(ref)
        active = (acts != 0).flatten(0, -2).any(0).nonzero()[:, 0]
        per_feature = torch.einsum("bpf,fd,bd->fbp", acts[..., active], W[active], direction)
        parts = [per_feature * (out_scale / scale)]
        labels = [f"F{i}" for i in active.tolist()]
        b_dec = sae.b_dec.detach().to(ref) @ direction.T  # [batch]
        parts.append((b_dec[:, None] * out_scale / scale)[None])
        labels.append("sae.b_dec")
        if stats is not None and sae.cfg.normalize_activations == "layer_norm":
            mu = stats[0][..., 0].to(ref) * direction.sum(-1)[:, None]
            parts.append((mu / scale)[None])
            labels.append("sae.norm_mean")
        if sae.name_of("hook_error") in cache:
            error = cache[sae.name_of("hook_error")].to(ref)
            parts.append((torch.einsum("bpd,bd->bp", error, direction) / scale)[None])
            labels.append("sae.error")
        full = logit_attribution(cache, target, heads=heads)
        before = contributions(cache, site.layer, site.where, heads=heads, direction=direction)
        skip = set(before.labels)
        keep = [i for i, lab in enumerate(full.labels) if lab not in skip]
        parts.append(full.values[keep].to(ref))
        labels += [full.labels[i] for i in keep]
    return Labelled.stack(labels, torch.cat(parts), sae.hook_name)


# ---- which SAEs are spliced, and how -----------------------------------------------------


def splice_of(model: Model, sae: Dictionary):
    """The splice hook of ``sae`` attached at its site in the caller's context (by
    ``model.saes``), or None when it is not spliced there."""
    hp = model.hook_dict.get(sae.hook_name)
    for fn in hp.fns if hp is not None else ():
        if getattr(fn, "spliced", None) is sae:
            return fn
    return None


def _spliced(model: Model, saes: Dictionary | Sequence[Dictionary]) -> list[Dictionary]:
    saes = [saes] if isinstance(saes, Dictionary) else list(saes)
    if not saes:
        raise ValueError("give at least one SAE")
    for sae in saes:
        if not isinstance(sae, Dictionary):
            raise TypeError(f"give SAEs (resid.sae.SAE), not {type(sae).__name__}")
        if splice_of(model, sae) is None:
            raise ValueError(
                f"{sae!r} is not spliced into this model: run inside `with model.saes([sae]):`"
            )
    return saes


def _labels(saes: list[Dictionary]) -> list[str]:
    if len(saes) == 1:
        return [f"F{i}" for i in range(saes[0].d_sae)]
    return [f"{s.hook_name}:F{i}" for s in saes for i in range(s.d_sae)]


def _clean_feature_acts(model: Model, saes: list, clean, tokens, mask) -> list[Tensor]:
    names = [s.name_of("hook_acts") for s in saes]
    if isinstance(clean, Tensor):
        clean = model.tokens(clean)
        if clean.shape != tokens.shape:
            raise ValueError(
                f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(tokens.shape)} "
                "differ in shape: patching pairs prompts and positions one to one"
            )
        with torch.no_grad():
            _, clean = model.run_with_cache(clean, names_filter=names, attention_mask=mask)
    out = []
    for name in names:
        if name not in clean:
            raise KeyError(f"the clean cache has no '{name}': cache it with the SAE spliced")
        act = clean[name]
        if act.shape[:2] != tokens.shape:
            raise ValueError(
                f"clean '{name}' is {tuple(act.shape)} but the corrupted tokens "
                f"{tuple(tokens.shape)}: pair them one to one"
            )
        out.append(act.to(model.device))
    return out


def _checked_inputs(model: Model, corrupted, clean, metric, saes, attention_mask) -> tuple:
    """What feature attribution and feature patching both start from, checked in this
    order: (the spliced ``saes`` as a list, the corrupted tokens, their mask, the metric,
    each SAE's clean feature activations ``[batch, pos, d_sae]``)."""
    saes = _spliced(model, saes)
    tokens = model.tokens(corrupted)
    mask = model.check_mask(attention_mask, tokens.shape)
    metric = as_metric(metric)
    return saes, tokens, mask, metric, _clean_feature_acts(model, saes, clean, tokens, mask)


# ---- attribution patching ----------------------------------------------------------------


def attribute_features(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: ActivationCache | Tensor,
    metric: Metric | MetricFn,
    saes: Dictionary | Sequence[Dictionary],
    *,
    by_pos: bool = False,
    attention_mask: Tensor | None = None,
) -> Labelled:
    """Attribution patching over every feature of the spliced ``saes`` at once: the
    corrupted metric plus ``grad · (clean - corrupted)`` of each feature's activation, from
    one forward and one backward (under any hooks attached around it). ``[feature]``
    (``[pos, feature]`` with ``by_pos``); with several SAEs the features are concatenated in
    order and labelled ``"{hook_name}:F{i}"``. ``clean`` is a cache of a spliced run or
    clean tokens.

    >>> with model.saes([sae]):
    ...     _, clean_cache = model.run_with_cache(clean)
    ...     est = attribute_features(model, corrupted, clean_cache, metric, [sae])
    >>> est.top(5)
    """
    saes, tokens, mask, metric, clean_acts = _checked_inputs(
        model, corrupted, clean, metric, saes, attention_mask
    )
    names = [s.name_of("hook_acts") for s in saes]
    baseline, acts, grads = metric_gradients(model, tokens, mask, metric, names)
    per_sae = []
    for name, grad, clean_act in zip(names, grads, clean_acts, strict=True):
        prod = (grad * (clean_act.to(grad) - acts[name])).float()
        if mask is not None:
            prod = prod * mask[..., None]
        per_sae.append(prod.sum(0) if by_pos else prod.sum((0, 1)))
    values = torch.cat(per_sae, -1).cpu() + baseline
    axes = ("pos", "feature") if by_pos else ("feature",)
    return Labelled(
        values, axes, {"feature": _labels(saes)}, site=names[0], baseline=float(baseline)
    )


# ---- real patching -----------------------------------------------------------------------


def _engine_site(model: Model, sae: Dictionary) -> str | None:
    """The patching engine's name for the SAE's site, where the engine can join a patched
    copy there (``resid_pre``, ``z``, …), else None."""
    layer = layer_of(sae.hook_name)
    if layer is None:
        return None
    for short, (_, stage) in SITES.items():
        if stage == "pre" and short != "resid_pre":
            continue  # an edit inside attention (q, k, v, pattern)
        if act_name(short, layer) == sae.hook_name:
            parallel = model.cfg.parallel_attn_mlp and (stage == "mid" or short == "mlp_out")
            return None if parallel else short
    return None


def _engine_can_run(model: Model, saes: list[Dictionary]) -> bool:
    """The engine runs the suffix of each copy through the model's blocks, so every hook
    attached must be an SAE splice that changes nothing (with its error term) and nobody
    may watch the SAEs' own hook points."""
    for hp in model.hook_dict.values():
        for fn in hp.fns:
            if not getattr(fn, "use_error_term", False):
                return False
        if hp.bwd_fns:
            return False
    return all(_engine_site(model, s) is not None for s in saes)


class _FeatureEngine(Engine):
    """The patching engine with one SAE's features as its cells: a copy joins at the
    SAE's site with the corrupted activation there plus ``(clean - corrupted activation of
    feature f) * write_matrix[f]`` (times the SAE's output scale), which is what the spliced
    SAE (with its error term) outputs when ``hook_acts[..., f]`` is replaced."""

    def __init__(self, model, site, corr, readout, mask, sae, x, corr_acts, clean_acts, stats):
        super().__init__(model, site, corr, {}, readout, mask)
        self.sae, self.x, self.corr_acts, self.clean_acts = sae, x, corr_acts, clean_acts
        self.scale = None if stats is None else stats[1]
        self.feature: dict[int, int] = {}  # id(cell) -> feature index

    def enter(self, layer: int, cells: list[Cell], start: int) -> tuple[Tensor, None]:
        s = slice(start, None)
        f = torch.tensor([self.feature[id(c)] for c in cells], device=self.x.device)
        diff = (self.clean_acts[:, s, f] - self.corr_acts[:, s, f]).movedim(-1, 0)  # [n, b, S]
        W = self.sae.write_matrix().detach()[f]  # [n, d_in]
        delta = diff[..., None].to(W) * W[:, None, None, :]
        if self.scale is not None:
            delta = delta * self.scale[None, :, s]
        x = self.x[:, s]
        value = (x[None] + delta.view(len(cells), *x.shape).to(x.dtype)).flatten(0, 1)
        return self.join(layer, value, start), None


def _corrupted_run(model: Model, tokens, mask, readout: Readout, sites: set[str], extra: list):
    """The corrupted forward, keeping what the engine reads (as ``patching.sweep`` does)."""
    cfg = model.cfg
    Te = readout.n_pos
    k = "rot_k" if cfg.positional == "rotary" else "k"
    names = {act_name(s, layer) for layer in range(cfg.n_layers) for s in ("resid_pre", k, "v")}
    if not cfg.parallel_attn_mlp:
        names |= {act_name("resid_mid", layer) for layer in range(cfg.n_layers)}
    names |= {act_name(s, layer) for s, layer in sites}
    names |= {act_name("resid_post", cfg.n_layers - 1), *extra}
    logits, corr = model.run_with_cache(
        tokens[:, :Te],
        names_filter=sorted(names),
        attention_mask=None if mask is None else mask[:, :Te],
    )
    return logits, dict(corr.items())


def patch_features(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: ActivationCache | Tensor,
    metric: Metric | MetricFn,
    saes: Dictionary | Sequence[Dictionary],
    features: Sequence[int] | Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    chunk: int | None = None,
    max_memory: float = 1e9,
) -> Labelled:
    """Real patching, one feature at a time: the corrupted run with feature ``f``'s
    activation (every position) taken from the clean run, one metric per feature.
    ``features`` index the concatenated features of ``saes``, as in
    :func:`attribute_features` (default: all of them).

    The patching engine runs it (``resid.interventions.engine``, as ``patching.sweep``):
    ``chunk`` features per batched pass (default: as many as fit in ``max_memory``
    bytes), each copy joining the forward at its SAE's site from the corrupted run, on the
    positions from the first one where the feature's clean and corrupted activations
    differ; a feature that never differs is the corrupted run and is not run. Where the
    engine cannot (hooks attached around the call beyond the splices themselves, an SAE
    spliced without its error term, a site inside attention, MLP or a norm), each feature
    is one plain forward under those hooks.

    >>> real = patch_features(model, corrupted, clean_cache, metric, [sae], est_top_indices)
    """
    saes, tokens, mask, metric, clean_acts = _checked_inputs(
        model, corrupted, clean, metric, saes, attention_mask
    )
    sizes = [s.d_sae for s in saes]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    total = int(offsets[-1])
    feats = (
        torch.arange(total)
        if features is None
        else torch.as_tensor(features, dtype=torch.long).flatten()
    )
    if len(feats) and ((feats < 0) | (feats >= total)).any():
        raise IndexError(f"feature indices must be in [0, {total}), got {feats.tolist()[:8]}")
    labels = [_labels(saes)[i] for i in feats.tolist()]
    which = torch.searchsorted(offsets, feats, right=True) - 1  # the SAE of each feature
    local = feats - offsets[which]
    with torch.no_grad():
        if _engine_can_run(model, saes):
            values, baseline = _patch_by_engine(
                model, tokens, mask, metric, saes, clean_acts, which, local, chunk, max_memory
            )
        else:
            values, baseline = _patch_one_by_one(
                model, tokens, mask, metric, saes, clean_acts, which, local
            )
    return Labelled(
        values,
        ("feature",),
        {"feature": labels},
        site=saes[0].name_of("hook_acts"),
        baseline=float(baseline),
    )


def _patch_one_by_one(model, tokens, mask, metric, saes, clean_acts, which, local):
    """One plain forward per feature, under whatever hooks the caller attached: the
    reference the engine reproduces."""
    baseline = scalar(metric(model(tokens, attention_mask=mask), attention_mask=mask))
    values = torch.empty(len(local))
    for j, (s_i, f) in enumerate(zip(which.tolist(), local.tolist(), strict=True)):
        src = clean_acts[s_i][..., f]

        def put(act: Tensor, hook, src=src, f=f) -> Tensor:
            act = act.clone()
            act[..., f] = src.to(act)
            return act

        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(saes[s_i].name_of("hook_acts"), put)], attention_mask=mask
        )
        values[j] = scalar(metric(logits, attention_mask=mask))
    return values, baseline


def _patch_by_engine(model, tokens, mask, metric, saes, clean_acts, which, local, chunk, budget):
    cfg, (b, T) = model.cfg, tokens.shape
    readout = Readout(model, metric, b, T, mask)
    Te = readout.n_pos
    places = [(_engine_site(model, s), layer_of(s.hook_name)) for s in saes]
    acts_names = [s.name_of("hook_acts") for s in saes]
    corr_logits, corr = _corrupted_run(model, tokens, mask, readout, set(places), acts_names)
    readout.prepare(corr[act_name("resid_post", cfg.n_layers - 1)], corr_logits)
    baseline = readout.baseline()
    values = torch.full((len(local),), float(baseline))
    width = 8 * cfg.d_model + 2 * cfg.d_mlp + 3 * cfg.n_heads * Te
    if readout.pos is None:
        width += cfg.d_vocab if readout.W_sel is None else readout.W_sel.shape[1]
    per_cell = b * Te * width * model.W_E.element_size()
    n = chunk or max(1, int(budget // per_cell))
    for s_i, sae in enumerate(saes):
        rows = (which == s_i).nonzero()[:, 0].tolist()
        if not rows:
            continue
        site, layer = places[s_i]
        x = corr[act_name(site, layer)]
        corr_acts = corr[acts_names[s_i]]
        cleans = clean_acts[s_i][:, :Te].to(corr_acts)
        stats = sae.stats(sae.flatten(x))  # ([b, T, 1], [b, T, 1]) or None
        engine = _FeatureEngine(model, site, corr, readout, mask, sae, x, corr_acts, cleans, stats)
        differs = (cleans != corr_acts).any(0)  # [pos, feature]
        groups: dict[int, list[Cell]] = {}
        for j in rows:
            f = int(local[j])
            where = differs[:, f].nonzero()[:, 0]
            if len(where) == 0:
                continue  # the patch changes nothing: the corrupted run
            cell = Cell(index=(j,), layer=layer, mask=torch.ones(0), start=int(where.min()))
            engine.feature[id(cell)] = f
            groups.setdefault(cell.start, []).append(cell)
        for start, group in sorted(groups.items()):
            for i in range(0, len(group), n):
                part = group[i : i + n]
                out = engine.run(part, start)
                for c in part:
                    values[c.index] = out[id(c)]
    return values, baseline


# ---- feature circuits --------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureCircuit:
    """What :func:`feature_circuit` found: the attribution estimate of every feature, the
    ``top`` features by it (indices into the concatenated features), their real patching
    values, and the correlation between estimate and real on those.

    >>> circuit.table()[:3]           # [(label, estimate, patched), ...]
    """

    estimate: Labelled
    top: list[int]
    patched: Labelled
    correlation: float

    def table(self) -> list[tuple[str, float, float]]:
        """``(label, estimate, patched)`` for each top feature."""
        labels = self.estimate.labels
        return [
            (labels[i], float(self.estimate.values[i]), float(p))
            for i, p in zip(self.top, self.patched.values, strict=True)
        ]


def feature_circuit(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: ActivationCache | Tensor,
    metric: Metric | MetricFn,
    saes: Dictionary | Sequence[Dictionary],
    k: int = 20,
    *,
    attention_mask: Tensor | None = None,
) -> FeatureCircuit:
    """Attribute every feature (one forward, one backward), then really patch the ``k``
    whose estimated effect is largest in size, and report how well the two agree.

    >>> with model.saes([sae]):
    ...     _, clean_cache = model.run_with_cache(clean)
    ...     circuit = feature_circuit(model, corrupted, clean_cache, metric, [sae], k=10)
    >>> circuit.correlation, circuit.table()[:3]
    """
    est = attribute_features(model, corrupted, clean, metric, saes, attention_mask=attention_mask)
    effect = (est.values - est.baseline).abs()
    top = effect.topk(min(k, len(effect))).indices.tolist()
    real = patch_features(model, corrupted, clean, metric, saes, top, attention_mask=attention_mask)
    corr = correlation(est.values[top], real.values) if len(top) > 1 else float("nan")
    return FeatureCircuit(est, top, real, corr)
