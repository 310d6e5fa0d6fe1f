"""Path patching (Wang et al. 2022): the effect of sender heads on the logits, or on
receiver heads' queries, keys or values only, with every other path frozen.

>>> path_patch(model, corrupted, clean_cache, metric, senders=[(9, 6), (9, 9)])   # direct
>>> path_patch_sweep(model, corrupted, clean_cache, metric, receivers=[(8, 6)], receiver_input="v")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm

from resid.core.labelled import Labelled
from resid.core.model import Model
from resid.interventions.engine import Readout, hook_name
from resid.interventions.metrics import Metric, MetricFn, as_metric
from resid.interventions.patching import Source, _clean_acts, _prepare

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
    readout: Readout,
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
            m = receivers[layer]
            if act.shape[2] != m.shape[0]:  # grouped k/v: a key/value head serves a group of
                m = m.view(act.shape[2], -1).any(-1)  # consecutive query heads, all receive
            m = m[None, None, :, None]
            hooks.append((name, lambda a, hook, new=act, m=m: torch.where(m, new, a)))
        with model.hooks(hooks):
            final = model(
                rep(corr[hook_name("resid_pre", low)]), start_at_layer=low, stop_at_layer=L
            )
    return readout.values(final, 0, n, at_read=False)


def _path_setup(model, corrupted, clean, metric, receivers, inputs):
    attached = model.attached_hooks()
    if attached:
        raise RuntimeError(
            f"path patching freezes every head to the clean or corrupted run, so hooks attached "
            f"around it ({', '.join(attached[:3])}{', …' if len(attached) > 3 else ''}) have no "
            "single meaning there: run it outside `with model.hooks(...)`, or fold the edit "
            "into the clean and corrupted caches you pass"
        )
    batch = _prepare(model, corrupted, None)  # checked once for the whole call
    tokens = batch.tokens
    metric = as_metric(metric)
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
    readout = Readout(model, metric, *tokens.shape)
    with torch.no_grad():
        names += [hook_name("resid_pre", layer) for layer in range(L)]
        names.append(hook_name("resid_post", L - 1))
        logits, corr = model.run_with_cache(batch, names_filter=names)
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
    clean tokens as ``corrupted`` and the corrupted cache as ``clean``. With grouped-query
    attention a receiver's ``k``/``v`` is its key/value head, which the other query heads
    of its group share: they receive the path too.

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
) -> Labelled:
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
    return Labelled(
        values, ("layer", "head"), site=f"path {receiver_input}", baseline=float(baseline)
    )
