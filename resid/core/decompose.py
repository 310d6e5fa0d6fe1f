"""Decomposition: the residual stream at any site is a sum of named writes.

    resid = embed + pos_embed
          + sum over earlier layers l of ( sum_h  z[:, :, h] @ W_O[l, h]   (head "L{l}H{h}")
                                           + b_O[l]                        ("L{l}.b_O")
                                           + mlp_out[l] )                  ("L{l}.mlp")

and an MLP's output splits further into its neurons, ``post[..., i] * W_out[i]``
(``"L{l}N{i}"``), plus its bias ``b_out`` (``"L{l}.b_out"``). Which layers count depends
on the site: ``blocks.l.hook_resid_pre`` holds layers ``< l``, ``hook_resid_mid`` adds
layer ``l``'s attention, ``hook_resid_post`` its MLP too.

Head outputs are computed from the cached ``hook_z`` and the ``W_O`` the forward uses
(or taken from ``hook_result`` when that was cached), so a cache without per-head results
is enough. Everything here reads a cache; nothing is run.

>>> _, cache = model.run_with_cache(tokens, names_filter=decomposition_hooks(model, 5))
>>> parts = cache.decompose_resid(5, "pre")
>>> parts.labels[:3], parts.components.shape     # ['embed', 'pos_embed', 'L0H0'], [component, batch, pos, d_model]
>>> torch.allclose(parts.sum(), cache["blocks.5.hook_resid_pre"], atol=1e-5)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from resid.core.labelled import Labelled
from resid.core.names import Site, act_name, locate
from resid.core.protocols import CacheLike, ModelLike


def _layers_in(site: Site) -> tuple[int, int]:
    """How many attention layers and MLP layers have written to the stream at ``site``
    (a parallel block has no ``resid_mid``: ``locate`` names one that is not a hook)."""
    if site.where == "final":
        return site.layer, site.layer
    attn = site.layer + (site.where in ("mid", "post"))
    return attn, site.layer + (site.where == "post")


def _neuron_layers(per_neuron: bool | Sequence[int], n_layers: int) -> set[int]:
    if per_neuron is True:
        return set(range(n_layers))
    if per_neuron is False:
        return set()
    return {layer % n_layers for layer in per_neuron}


def decomposition_hooks(
    model: ModelLike,
    layer: int | None = None,
    where: str = "pre",
    heads: bool = True,
    per_neuron: bool | Sequence[int] = False,
) -> list[str]:
    """The hook names a cache needs to decompose the stream at ``(layer, where)``: pass
    them as ``run_with_cache``'s ``names_filter``."""
    site = locate(model.cfg.n_layers, layer, where)
    n_attn, n_mlp = _layers_in(site)
    neurons = _neuron_layers(per_neuron, model.cfg.n_layers)
    names = [act_name("embed")]
    if model.cfg.positional == "learned":
        names.append(act_name("pos_embed"))
    for layer in range(max(n_attn, n_mlp)):
        if layer < n_attn:
            names.append(act_name("z" if heads else "attn_out", layer))
        if layer < n_mlp:
            names.append(act_name("post" if layer in neurons else "mlp_out", layer))
    return names


def contributions(
    cache: CacheLike,
    layer: int | None = None,
    where: str = "pre",
    heads: bool = True,
    per_neuron: bool | Sequence[int] = False,
    direction: Float[Tensor, "batch d_model"] | None = None,
) -> Labelled:
    """The decomposition of the stream at ``(layer, where)``; with ``direction``, each part's
    dot product with it instead (``[component, batch, pos]``), computed without building
    the per-head or per-neuron vectors."""
    model = cache.model
    n_layers = model.cfg.n_layers
    site = locate(n_layers, layer, where)
    needed = decomposition_hooks(model, site.layer, site.where, heads, per_neuron)
    has_result = {act_name("z", lyr) for lyr in range(n_layers) if act_name("result", lyr) in cache}
    needed = [n for n in needed if n not in has_result]  # head results cached: z not needed
    cache.require(
        needed,
        f"decomposing {site.name}",
        f"resid.core.decompose.decomposition_hooks(model, {site.layer}, {site.where!r}"
        + (", heads=False" if not heads else "")
        + (f", per_neuron={per_neuron!r}" if per_neuron is not False else "")
        + ")",
    )
    n_attn, n_mlp = _layers_in(site)
    neurons = _neuron_layers(per_neuron, model.cfg.n_layers)
    ref = cache[act_name("embed")]

    def w(t: Tensor) -> Tensor:  # a weight, on the cache's device and in its dtype
        return t.detach().to(ref)

    def project(x: Float[Tensor, "n batch pos d_model"]) -> Tensor:
        if direction is None:
            return x
        return einsum(x, direction, "n batch pos d_model, batch d_model -> n batch pos")

    def bias(b: Float[Tensor, " d_model"]) -> Tensor:
        return project(w(b).expand(1, *ref.shape))

    labels, parts = ["embed"], [project(ref[None])]
    if model.cfg.positional == "learned":  # rotary models add positions inside attention
        labels.append("pos_embed")
        parts.append(project(cache[act_name("pos_embed")][None]))
    for lyr in range(max(n_attn, n_mlp)):
        blk = model.blocks[lyr]
        if lyr < n_attn:
            if not heads:
                labels.append(f"L{lyr}.attn")
                parts.append(project(cache[act_name("attn_out", lyr)][None]))
            else:
                labels += [f"L{lyr}H{h}" for h in range(model.cfg.n_heads)] + [f"L{lyr}.b_O"]
                if act_name("result", lyr) in cache or direction is None:
                    out = rearrange(cache.head_results(lyr), "b p head d -> head b p d")
                    parts.append(project(out))
                else:  # z · (W_O · direction): never build the per-head vectors
                    W_Od = einsum(w(blk.attn.W_O), direction, "h e d, b d -> b h e")
                    z = cache[act_name("z", lyr)]
                    parts.append(einsum(z, W_Od, "b p h e, b h e -> h b p"))
                parts.append(bias(blk.attn.b_O))
        if lyr < n_mlp:
            if lyr not in neurons:
                labels.append(f"L{lyr}.mlp")
                parts.append(project(cache[act_name("mlp_out", lyr)][None]))
                continue
            post = cache[act_name("post", lyr)]
            labels += [f"L{lyr}N{i}" for i in range(post.shape[-1])] + [f"L{lyr}.b_out"]
            if direction is None:
                parts.append(einsum(post, w(blk.mlp.W_out), "b p m, m d -> m b p d"))
            else:
                W_outd = einsum(w(blk.mlp.W_out), direction, "m d, b d -> b m")
                parts.append(einsum(post, W_outd, "b p m, b m -> m b p"))
            parts.append(bias(blk.mlp.b_out))
    return Labelled.stack(labels, torch.cat(parts), site.name)
