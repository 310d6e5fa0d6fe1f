"""Interventions from a graph: scale a set of feature nodes in the real model (each through
its transcoder: the MLP's output moves by ``(scale - 1) * a * W_dec[f]`` at the feature's
position, the error term, the real MLP, kept), and compare the change in the logits with
what the graph predicts by propagating the change along its edges (a downstream feature's
pre-activation moves by the sum of its changed inputs; its activation follows through the
ReLU; the logits move by their changed inputs).

>>> predicted, actual = effects(model, tcs, graph, [[0], [1], [2]], scale=0.0)
>>> torch.corrcoef(torch.stack([predicted[:, 0], actual[:, 0]]))[0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.protocols import ModelLike
from resid.graphs.attribute import check_transcoders
from resid.graphs.graph import Graph
from resid.sae.transcoder import Transcoder

MODES = ("real", "frozen_attention", "replacement")


def intervene(
    model: ModelLike,
    transcoders: Sequence[Transcoder],
    tokens: Tensor,
    features: Sequence[tuple[int, int, int]],
    scale: float = 0.0,
    mode: str = "real",
) -> Float[Tensor, "pos d_vocab"]:
    """The model's logits on ``tokens`` with each ``(layer, pos, feature)`` scaled to
    ``scale`` times its activation in this run (0: ablated, 2: doubled), through its
    transcoder. ``mode``: ``"real"`` (everything else runs as it is: the real MLPs
    respond), ``"frozen_attention"`` (attention patterns held at the unintervened run's,
    as circuit-tracer's interventions do by default) or ``"replacement"`` (the local
    replacement model the graph describes: patterns and norm scales held, each MLP's
    output the transcoder's plus the unintervened run's error term, the first position
    as it was), where the graph's prediction is exact but for ReLU thresholds crossed.

    >>> logits = intervene(model, tcs, g.tokens, [(1, 4, 17)], scale=0.0)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    tcs = {t.layer: t for t in check_transcoders(model, transcoders)}
    chosen: dict[int, list[tuple[int, int]]] = {}
    for layer, pos, f in features:
        if layer not in tcs or not 0 <= pos < len(tokens) or not 0 <= f < tcs[layer].d_sae:
            raise ValueError(f"no feature ({layer}, {pos}, {f}) in these transcoders and prompt")
        chosen.setdefault(int(layer), []).append((int(pos), int(f)))
    n = model.cfg.n_layers
    frozen = []
    if mode != "real":
        frozen = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    if mode == "replacement":
        frozen += [f"blocks.{i}.{ln}.hook_scale" for i in range(n) for ln in ("ln1", "ln2")]
        frozen += ["ln_final.hook_scale"] + [t.hook_name for t in tcs.values()]
        frozen += [t.hook_name_out for t in tcs.values()]
    layers = range(n) if mode == "replacement" else chosen
    seen: dict[int, Tensor] = {}

    def read(x, hook):
        seen[hook.layer()] = x

    def write(out, hook):
        layer = hook.layer()
        t, x = tcs[layer], seen.pop(layer)
        acts = t.encode(x)
        if mode == "replacement":  # the transcoder's output plus the clean run's error
            x0 = clean[t.hook_name]
            clean_acts = t.encode(x0)
            acts[:, 0] = clean_acts[:, 0]  # the first position is not in the graph
            error = clean[t.hook_name_out] - t.decode(clean_acts, x0)
            new = acts.clone()
            for pos, f in chosen.get(layer, ()):
                new[:, pos, f] = scale * acts[:, pos, f]
            return (t.decode(new, x) + error).to(out.dtype)
        delta = torch.zeros_like(out)
        for pos, f in chosen[layer]:
            delta[:, pos] += ((scale - 1) * acts[:, pos, f, None] * t.W_dec[f]).to(out.dtype)
        return out + delta

    fwd = [(tcs[layer].hook_name, read) for layer in layers]
    fwd += [(tcs[layer].hook_name_out, write) for layer in layers]
    with torch.no_grad():
        clean = {}
        if frozen:
            _, clean = model.run_with_cache(tokens[None], names_filter=frozen)
            held = [s for s in frozen if "hook_pattern" in s or "hook_scale" in s]
            fwd += [(name, lambda x, hook: clean[hook.name]) for name in held]
        return model.run_with_hooks(tokens[None], fwd_hooks=fwd)[0]


def predicted_change(graph: Graph, nodes: Sequence[int], scale: float = 0.0) -> Tensor:
    """The change in each logit node's (demeaned) value the graph predicts when the
    feature nodes ``nodes`` are scaled to ``scale`` times their activation: ``[n_logits]``.

    >>> predicted_change(g, [0, 3], scale=0.0)
    """
    n = graph.n_features
    if any(not 0 <= i < n for i in nodes):
        raise ValueError(f"intervened nodes must be feature nodes, 0..{n - 1}")
    acts = graph.activations.float()
    per_unit = graph.adjacency[:, :n] / acts.clamp(min=1e-12)  # effect per unit of activation
    delta = torch.zeros(n)
    fixed = set(int(i) for i in nodes)
    for i in range(n):  # features are in layer order: inputs come first
        if i in fixed:
            delta[i] = (scale - 1) * acts[i]
        else:
            pre_change = per_unit[i] @ delta
            delta[i] = torch.clamp(acts[i] + pre_change, min=0) - acts[i]  # through the ReLU
    return per_unit[graph.logit_offset :] @ delta


def effects(
    model: ModelLike,
    transcoders: Sequence[Transcoder],
    graph: Graph,
    node_sets: Sequence[Sequence[int]],
    scale: float = 0.0,
    mode: str = "real",
) -> tuple[Float[Tensor, "n_sets n_logits"], Float[Tensor, "n_sets n_logits"]]:
    """(predicted, actual) change in the demeaned logits of the graph's logit tokens at the
    last position, for each set of feature nodes scaled to ``scale`` (see ``intervene``).

    >>> predicted, actual = effects(model, tcs, g, [[i] for i in range(10)])
    """
    tokens = graph.tokens.to(model.W_E.device)
    ids = graph.logit_tokens

    def demeaned(logits: Tensor) -> Tensor:
        last = logits[-1].float().cpu()
        return last[ids] - last.mean()

    with torch.no_grad():
        base = demeaned(model(tokens[None])[0])
    predicted, actual = [], []
    for nodes in node_sets:
        feats = [tuple(int(v) for v in graph.active_features[i]) for i in nodes]
        logits = intervene(model, transcoders, tokens, feats, scale, mode)
        actual.append(demeaned(logits) - base)
        predicted.append(predicted_change(graph, nodes, scale))
    return torch.stack(predicted), torch.stack(actual)
