"""Stacking the residual stream's parts as TransformerLens' ``ActivationCache`` does.

Every function reads a cache (nothing is run) and stacks parts of the stream on a leading
``component`` axis, with TransformerLens' labels: heads ``"L3H5"``, neurons ``"L3N17"``,
MLP layers ``"3_mlp_out"``, streams ``"3_pre"`` / ``"3_mid"`` / ``"final_post"``,
``"embed"``, ``"pos_embed"``, ``"bias"``, ``"remainder"``. The results are ``Labelled``
(``.values`` is the tensor, ``.labels`` the labels); ``return_labels=True`` gives
TransformerLens' ``(tensor, labels)`` instead. The thin methods of ``ActivationCache``
(``cache.stack_head_results(...)``) call these.

Slices (``pos_slice``, ``batch_slice``, ``neuron_slice``) are TransformerLens' ``Slice``
inputs: ``None`` (everything), an int (that index, the axis dropped), a ``(start, stop[,
step])`` tuple, a ``slice``, or a list / tensor of indices.

>>> stack = cache.stack_head_results(layer=-1, pos_slice=-1)    # Labelled, [L*H, batch, d_model]
>>> stack.labels[:2]                                            # ['L0H0', 'L0H1']
>>> parts = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=False)
>>> torch.allclose(parts.values.sum(0), cache.apply_ln_to_stack(cache["resid_post", -1][None])[0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from resid.core.labelled import Labelled
from resid.core.names import act_name, info
from resid.core.protocols import CacheLike, ModelLike

SliceInput = int | tuple | slice | Sequence[int] | Tensor | None
Stack = Float[Tensor, "component ... d_model"]


def apply_slice(t: Tensor, s: SliceInput, dim: int) -> Tensor:
    """``t`` sliced along ``dim`` by a TransformerLens ``Slice`` input (an int drops it)."""
    if s is None:
        return t
    index: object
    if isinstance(s, tuple):
        index = slice(*s)
    elif isinstance(s, (int, slice)) and not isinstance(s, bool):
        index = s
    elif isinstance(s, Tensor) and s.dim() == 0:
        index = int(s)
    elif isinstance(s, (list, Tensor)):
        index = torch.as_tensor(s, device=t.device)
    else:
        raise ValueError(
            f"a slice is None, an int, a (start, stop) tuple, a slice or a list of indices, not {s!r}"
        )
    dim = dim % t.dim()
    return t[(slice(None),) * dim + (index,)]


def key_name(model: ModelLike, key: str | tuple) -> str:
    """A cache key as a hook name: a full name, a short one (``"embed"``), or TransformerLens'
    ``(name, layer[, layer_type])`` (``("pattern", 3)``, ``("q", 2, "attn")``,
    ``("scale", 4, "ln1")``; a negative layer counts from the end)."""
    if isinstance(key, str):
        return key if key in model.hook_dict else act_name(key)
    if not isinstance(key, tuple) or not 1 <= len(key) <= 3 or not isinstance(key[0], str):
        raise KeyError(
            f"a cache key is a hook name or a (name, layer[, layer_type]) tuple, not {key!r}"
        )
    name, layer, kind = (*key, None, None)[:3]
    if layer is not None and layer < 0:
        layer += model.cfg.n_layers
    ln = kind if kind in ("ln1", "ln2") else None
    return act_name(name, layer, ln)


def _layer(model: ModelLike, layer: int | None) -> int:
    n = model.cfg.n_layers
    layer = n if layer is None or layer == -1 else layer
    if not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"layer must be in [0, {n}] (or None / -1 for all), not {layer!r}")
    return layer


def _out(stack: Tensor, labels: list[str], site: str, return_labels: bool, rest: tuple[str, ...]):
    if return_labels:
        return stack, labels
    return Labelled(stack, ("component", *rest), {"component": labels}, site)


def _rest(cache: CacheLike, stack: Tensor, pos_slice: SliceInput) -> tuple[str, ...]:
    """The axis names after ``component``: batch, pos (unless an int slice dropped it), d_model."""
    axes = ["batch", "pos", "d_model"][-(stack.dim() - 1) :]
    if stack.dim() == 3 and isinstance(pos_slice, int):
        axes = ["batch", "d_model"]
    return tuple(axes)


def stack_head_results(
    cache: CacheLike,
    layer: int | None = -1,
    return_labels: bool = False,
    incl_remainder: bool = False,
    pos_slice: SliceInput = None,
    apply_ln: bool = False,
) -> Labelled | tuple[Stack, list[str]]:
    """Every head's result (``z @ W_O``, no ``b_O``) in the layers before ``layer``
    (``-1`` / ``None``: all), ``"L{l}H{h}"``; ``incl_remainder`` adds the rest of the stream
    entering ``layer``; ``apply_ln`` scales as the norm reading that stream does.

    >>> cache.stack_head_results(layer=-1, pos_slice=-1).top(3)
    """
    model = cache.model
    layer = _layer(model, layer)
    parts, labels = [], []
    for lyr in range(layer):
        heads = apply_slice(cache.head_results(lyr), pos_slice, 1)  # [batch, pos, head, d]
        parts.append(rearrange(heads, "... head d -> head ... d"))
        labels += [f"L{lyr}H{h}" for h in range(model.cfg.n_heads)]
    return _stacked(cache, parts, labels, layer, "head results", pos_slice, incl_remainder,
                    apply_ln, return_labels)  # fmt: skip


def _stacked(
    cache: CacheLike,
    parts: list[Tensor],
    labels: list[str],
    layer: int,
    what: str,
    pos_slice: SliceInput,
    incl_remainder: bool,
    apply_ln: bool,
    return_labels: bool,
) -> Labelled | tuple[Stack, list[str]]:
    """``parts`` stacked on a ``component`` axis; ``incl_remainder`` adds what the stream
    entering ``layer`` holds besides them, ``apply_ln`` scales as the norm reading it."""
    stack = torch.cat(parts) if parts else _empty(cache, pos_slice)
    if incl_remainder:
        stream = apply_slice(_stream_into(cache, layer), pos_slice, 1)
        stack = torch.cat([stack, (stream - stack.sum(0))[None]])
        labels.append("remainder")
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, pos_slice=pos_slice)
    return _out(
        stack, labels, f"{what} into layer {layer}", return_labels, _rest(cache, stack, pos_slice)
    )


def _empty(cache: CacheLike, pos_slice: SliceInput) -> Tensor:
    ref = apply_slice(cache[act_name("embed")], pos_slice, 1)
    return ref.new_zeros(0, *ref.shape)


def _stream_into(cache: CacheLike, layer: int, mlp_input: bool = False) -> Tensor:
    """The stream entering ``layer`` (``resid_mid`` for the MLP's input; the final
    stream for ``layer = n_layers``)."""
    n = cache.model.cfg.n_layers
    if mlp_input:
        return cache[act_name("resid_mid", layer)]
    return (
        cache[act_name("resid_post", n - 1)] if layer == n else cache[act_name("resid_pre", layer)]
    )


def stack_activation(
    cache: CacheLike, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None
) -> Labelled:
    """``cache[activation_name, l]`` for every layer before ``layer``, on a leading ``layer``
    axis (TransformerLens' ``stack_activation``; ``.values`` is the tensor).

    >>> cache.stack_activation("pattern").values.shape   # [layer, batch, head, q, k]
    """
    model = cache.model
    layer = _layer(model, layer)
    names = [key_name(model, (activation_name, lyr, sublayer_type)) for lyr in range(layer)]
    cache.require(names, f"stack_activation({activation_name!r})", f"{names!r}")
    stack = torch.stack([cache[n] for n in names])
    site = info(names[0]) if names else None
    axes = ("layer", *(site.axes if site else [f"dim{i}" for i in range(stack.dim() - 1)]))
    return Labelled(stack, axes, {"layer": [str(i) for i in range(layer)]}, activation_name)


def stack_neuron_results(
    cache: CacheLike,
    layer: int | None = -1,
    pos_slice: SliceInput = None,
    neuron_slice: SliceInput = None,
    return_labels: bool = False,
    incl_remainder: bool = False,
    apply_ln: bool = False,
) -> Labelled | tuple[Stack, list[str]]:
    """Every neuron's write (``post[..., i] * W_out[i]``, no ``b_out``) in the layers before
    ``layer``, ``"L{l}N{i}"`` (``neuron_slice`` picks neurons); ``incl_remainder`` and
    ``apply_ln`` as in :func:`stack_head_results`.

    >>> cache.stack_neuron_results(2, pos_slice=-1, neuron_slice=(0, 10))
    """
    model = cache.model
    layer = _layer(model, layer)
    d_mlp = model.cfg.d_mlp
    index = apply_slice(torch.arange(d_mlp), neuron_slice, 0).reshape(-1)
    parts, labels = [], []
    for lyr in range(layer):
        name = act_name("post", lyr)
        cache.require([name], "stack_neuron_results", f"[{name!r}, ...]")
        post = apply_slice(cache[name], pos_slice, 1)[..., index.to(cache[name].device)]
        W_out = model.blocks[lyr].mlp.W_out.detach()[index.to(model.blocks[lyr].mlp.W_out.device)]
        parts.append(rearrange(post[..., None] * W_out.to(post), "... n d -> n ... d"))
        labels += [f"L{lyr}N{i}" for i in index.tolist()]
    return _stacked(cache, parts, labels, layer, "neuron results", pos_slice, incl_remainder,
                    apply_ln, return_labels)  # fmt: skip


def apply_ln_to_stack(
    cache: CacheLike,
    residual_stack: Stack,
    layer: int | None = None,
    mlp_input: bool = False,
    pos_slice: SliceInput = None,
    batch_slice: SliceInput = None,
    has_batch_dim: bool = True,
    recompute_ln: bool = False,
) -> Stack:
    """Parts of the stream entering ``layer`` (``None``: the unembedding) as that layer's norm
    sees them: centred (LayerNorm) and divided by the scale it computed for the whole stream
    (the cached ``hook_scale`` of ``ln1``, ``ln2`` with ``mlp_input``, or ``ln_final``), so
    they sum to its normalised input. The gain is not applied (TransformerLens' meaning: on
    its processed weights there is none). ``recompute_ln`` at the unembedding applies
    ``ln_final`` itself to each part (gain included), as a logit lens does.

    >>> cache.apply_ln_to_stack(cache.stack_head_results(), layer=None)
    """
    model = cache.model
    n = model.cfg.n_layers
    layer = _layer(model, layer)
    if has_batch_dim:
        residual_stack = apply_slice(residual_stack, batch_slice, 1)
    if recompute_ln and layer == n:
        return model.ln_final.plain(residual_stack)
    if model.cfg.normalization in ("LN", "LNPre"):
        residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
    if layer == n:
        name = act_name("scale")
    else:
        name = act_name("scale", layer, "ln2" if mlp_input else "ln1")
    cache.require([name], "apply_ln_to_stack", f"[{name!r}, ...]")
    scale = apply_slice(cache[name], pos_slice, 1)
    scale = apply_slice(scale, batch_slice, 0) if has_batch_dim else scale[0]
    return residual_stack / scale.to(residual_stack)


def accumulated_names(
    model: ModelLike, layer: int | None = None, incl_mid: bool = False, mlp_input: bool = False
) -> tuple[int, list[str], list[str]]:
    """``(layer, hook names, labels)`` of the accumulated residual stream up to ``layer``
    (``None`` / ``-1``: ``n_layers``, the final stream): each ``resid_pre`` (``"0_pre"``...),
    with ``incl_mid`` each earlier ``resid_mid``, with ``mlp_input`` layer ``layer``'s own,
    ending with ``"final_post"`` at ``n_layers``. TransformerLens' meaning and labels.

    >>> accumulated_names(model, 1, incl_mid=True)[2]     # ['0_pre', '0_mid', '1_pre']
    """
    n = model.cfg.n_layers
    layer = _layer(model, layer)
    names, labels = [], []
    for lyr in range(layer + 1):
        if lyr == n:
            names.append(act_name("resid_post", n - 1))
            labels.append("final_post")
            continue
        names.append(act_name("resid_pre", lyr))
        labels.append(f"{lyr}_pre")
        if (incl_mid and lyr < layer) or (mlp_input and lyr == layer):
            names.append(act_name("resid_mid", lyr))
            labels.append(f"{lyr}_mid")
    return layer, names, labels


def accumulated_resid(
    cache: CacheLike,
    layer: int | None = None,
    incl_mid: bool = False,
    apply_ln: bool = False,
    pos_slice: SliceInput = None,
    mlp_input: bool = False,
    return_labels: bool = False,
) -> Labelled | tuple[Stack, list[str]]:
    """The stream entering each layer up to ``layer`` (``"0_pre"``...), with each earlier
    ``resid_mid`` when ``incl_mid`` (and ``layer``'s own with ``mlp_input``), ending with
    ``"final_post"`` when ``layer`` is the last. ``apply_ln``: into the unembedding,
    ``ln_final`` recomputed on each (the logit lens); into a layer, that layer's cached
    scale (:func:`apply_ln_to_stack`). TransformerLens' meaning and labels.

    >>> cache.accumulated_resid(apply_ln=True, incl_mid=True).labels[:3]   # ['0_pre', '0_mid', '1_pre']
    """
    n = cache.model.cfg.n_layers
    layer, names, labels = accumulated_names(cache.model, layer, incl_mid, mlp_input)
    cache.require(names, "accumulated_resid", f"{names!r}")
    stack = torch.stack([apply_slice(cache[name], pos_slice, 1) for name in names])
    if apply_ln:
        stack = apply_ln_to_stack(
            cache, stack, layer, mlp_input, pos_slice=pos_slice, recompute_ln=layer == n
        )
    return _out(
        stack, labels, "accumulated residual", return_labels, _rest(cache, stack, pos_slice)
    )


def accumulated_bias(
    model: ModelLike, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
) -> Float[Tensor, " d_model"]:
    """The sum of every bias written to the stream before ``layer``: each attention layer's
    ``b_O`` (with ``mlp_input``, layer ``layer``'s too) and, with ``include_mlp_biases``,
    each MLP's ``b_out``. TransformerLens' ``accumulated_bias``.

    >>> model.accumulated_bias(3)         # [d_model]
    """
    n = model.cfg.n_layers
    if not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"layer must be in [0, {n}], not {layer!r}")
    total = model.W_E.new_zeros(model.cfg.d_model).detach()
    for lyr in range(layer):
        total = total + model.blocks[lyr].attn.b_O.detach()
        if include_mlp_biases:
            total = total + model.blocks[lyr].mlp.b_out.detach()
    if mlp_input:
        if layer == n:
            raise ValueError("mlp_input=True needs a block: layer must be below n_layers")
        total = total + model.blocks[layer].attn.b_O.detach()
    return total


def get_full_resid_decomposition(
    cache: CacheLike,
    layer: int | None = None,
    mlp_input: bool = False,
    expand_neurons: bool = True,
    apply_ln: bool = False,
    pos_slice: SliceInput = None,
    return_labels: bool = False,
) -> Labelled | tuple[Stack, list[str]]:
    """The stream entering ``layer`` (``None``: the unembedding; ``mlp_input``: the MLP's)
    as every head's result, every neuron's write (or each MLP's output, ``"{l}_mlp_out"``,
    with ``expand_neurons=False``), ``"embed"``, ``"pos_embed"`` and the summed biases
    ``"bias"``: the parts sum to the stream. TransformerLens' order and labels.

    >>> parts = cache.get_full_resid_decomposition(expand_neurons=False)
    >>> torch.allclose(parts.values.sum(0), cache["resid_post", -1], atol=1e-5)
    """
    model = cache.model
    layer = _layer(model, layer)
    if mlp_input and layer == model.cfg.n_layers:
        raise ValueError("mlp_input=True needs a block: the unembedding has no MLP")
    heads, labels = stack_head_results(cache, layer + mlp_input, True, pos_slice=pos_slice)
    parts = [heads]
    if layer > 0:
        if expand_neurons:
            neurons, more = stack_neuron_results(cache, layer, pos_slice, return_labels=True)
        else:
            names = [act_name("mlp_out", lyr) for lyr in range(layer)]
            cache.require(names, "get_full_resid_decomposition", f"{names!r}")
            neurons = torch.stack([apply_slice(cache[nm], pos_slice, 1) for nm in names])
            more = [f"{lyr}_mlp_out" for lyr in range(layer)]
        parts.append(neurons)
        labels += more
    for name in ("embed", "pos_embed"):
        if act_name(name) in cache:
            parts.append(apply_slice(cache[act_name(name)], pos_slice, 1)[None])
            labels.append(name)
    bias = accumulated_bias(model, layer, mlp_input, include_mlp_biases=expand_neurons)
    parts.append(bias.to(heads).expand(1, *heads.shape[1:]))
    labels.append("bias")
    stack = torch.cat([p.to(heads) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input, pos_slice=pos_slice)
    return _out(
        stack,
        labels,
        f"full decomposition into layer {layer}",
        return_labels,
        _rest(cache, stack, pos_slice),
    )
