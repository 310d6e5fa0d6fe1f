"""Reading the residual stream in vocabulary space: accumulated residual, logit lens, and
direct logit attribution.

The final LayerNorm is ``ln_final(x) = (x - mean(x)) / scale(x) * w + b``, with one
``scale`` per (batch, pos). Two ways to use it, chosen per question:

- **Logit lens** (``accumulated_resid(apply_ln=True)``, ``logit_lens``) *recomputes*
  ``ln_final`` on each intermediate stream, as if the model stopped there. The last entry
  is the final stream, so its logit lens is the model's logits.
- **Direct logit attribution** (``logit_attribution``) splits the *final* stream into its
  parts and sends each through the LayerNorm the model actually applied: centred, divided by
  the final stream's ``scale`` (``ln_final.hook_scale`` when cached, else recomputed from the
  final stream, which is the same number), times ``w``. That is linear in the parts, so the
  attributions plus the bias term ``b · u`` add up to the real logit.

>>> _, cache = model.run_with_cache(tokens)
>>> cache.logit_lens().shape                        # [n_layers + 1, batch, pos, d_vocab]
>>> dla = cache.logit_attribution((" Mary", " John"))   # logit difference, every part
>>> dla.top(5, pos=-1)                              # [('L9H9', 3.1), ('L10H7', -1.9), ...]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.decompose import contributions
from resid.core.labelled import Labelled
from resid.core.names import act_name
from resid.core.protocols import CacheLike, ModelLike
from resid.core.stacking import accumulated_names

Target = int | str | tuple | list | Tensor


def apply_ln_final(
    model: ModelLike, x: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """``ln_final`` recomputed on ``x`` (its own mean and scale), gain and bias included."""
    return model.ln_final.plain(x)


def accumulated_resid(
    cache: CacheLike,
    layer: int | None = None,
    incl_mid: bool = False,
    apply_ln: bool = False,
    return_labels: bool = False,
) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
    """The stream entering each layer ``0..layer`` (``resid_pre``), then, when ``layer`` is
    ``None``, ``-1`` or ``n_layers``, the final stream: TransformerLens' meaning and labels
    (``"0_pre"``, ..., ``"final_post"``). ``incl_mid`` adds each earlier layer's
    ``resid_mid``; ``apply_ln`` recomputes ``ln_final`` on every entry (the logit lens)."""
    _, names, labels = accumulated_names(cache.model, layer, incl_mid)
    cache.require(names, "accumulated_resid", f"{names!r}")
    stack = torch.stack([cache[name] for name in names])
    if apply_ln:
        stack = apply_ln_final(cache.model, stack)
    return (stack, labels) if return_labels else stack


def logit_lens(
    cache: CacheLike, layer: int | None = None, return_labels: bool = False
) -> Float[Tensor, "component batch pos d_vocab"] | tuple[Tensor, list[str]]:
    """``ln_final(stream) @ W_U`` for every stream of ``accumulated_resid(layer)``, with
    ``ln_final`` recomputed per stream. The last entry (``"final_post"``) is the logits.

    Memory is ``(n_layers + 1) * batch * pos * d_vocab`` floats: slice the cache's batch or
    positions first for long inputs."""
    stack, labels = accumulated_resid(cache, layer, apply_ln=True, return_labels=True)
    logits = stack @ cache.model.W_U.detach().to(stack)
    return (logits, labels) if return_labels else logits


def _token(model: ModelLike, t: int | str) -> int:
    if isinstance(t, str):
        return model.to_single_token(t)
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.cfg.d_vocab:
        raise ValueError(
            f"a token must be a string or an id in [0, {model.cfg.d_vocab}), not {t!r}"
        )
    return t


def unembed_direction(
    model: ModelLike, target: Target, batch: int
) -> Float[Tensor, "batch d_model"]:
    """The direction in ``ln_final``'s output space whose dot product is the quantity asked
    for: a token (id or one-token string) → ``W_U[:, t]``; a pair ``(a, b)`` →
    ``W_U[:, a] - W_U[:, b]`` (a logit difference); a float tensor ``[d_model]`` or
    ``[batch, d_model]`` → itself; an int tensor ``[batch]`` / ``[batch, 2]`` → one token /
    one pair per sequence."""
    W_U = model.W_U.detach()
    d = model.cfg.d_model
    if isinstance(target, (int, str)):
        u = W_U[:, _token(model, target)]
    elif isinstance(target, (tuple, list)) and len(target) == 2:
        u = W_U[:, _token(model, target[0])] - W_U[:, _token(model, target[1])]
    elif isinstance(target, Tensor) and target.dtype.is_floating_point:
        if target.shape not in ((d,), (batch, d)):
            raise ValueError(
                f"a direction must be [d_model={d}] or [batch={batch}, d_model], got {tuple(target.shape)}"
            )
        u = target
    elif isinstance(target, Tensor) and not target.dtype.is_complex and target.dtype != torch.bool:
        if target.shape not in ((batch,), (batch, 2)):
            raise ValueError(
                f"token ids per sequence must be [batch={batch}] or [batch, 2], got {tuple(target.shape)}"
            )
        ids = [[_token(model, t) for t in row] for row in target.reshape(batch, -1).tolist()]
        ids = torch.tensor(ids, device=W_U.device)
        u = W_U[:, ids[:, 0]].T if ids.shape[1] == 1 else (W_U[:, ids[:, 0]] - W_U[:, ids[:, 1]]).T
    else:
        raise TypeError(
            "logit_attribution takes a token (id or string), a pair of tokens, a float direction "
            f"[d_model], or token ids [batch] / [batch, 2]; got {type(target).__name__}"
        )
    return u.expand(batch, d)


def readout_direction(
    model: ModelLike, u: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "batch d_model"]:
    """The direction ``d`` in the final stream along which a part ``c`` moves the output
    ``ln_final(final) · u``: ``c · d / scale``, with ``d = centre(w * u)`` as the model's
    norm does it (LayerNorm centres, RMSNorm does not). Direct logit attribution and SAE
    direct feature attribution both project onto it.

    >>> d = readout_direction(model, unembed_direction(model, (" Mary", " John"), batch))
    """
    return model.ln_final.centre(u * model.ln_final.w.detach().to(u))


def final_scale(cache: CacheLike) -> Float[Tensor, "batch pos 1"]:
    """``ln_final``'s scale: the cached ``ln_final.hook_scale``, else recomputed from the
    final stream (the same computation the forward did)."""
    scale = act_name("scale")  # ln_final.hook_scale
    if scale in cache:
        return cache[scale]
    final = act_name("resid_post", cache.model.cfg.n_layers - 1)
    cache.require([final], "ln_final's scale", f"[..., '{scale}' or '{final}']")
    x = cache[final]
    return cache.model.ln_final.scale(x).to(x.dtype)


def logit_attribution(
    cache: CacheLike,
    target: Target,
    heads: bool = True,
    per_neuron: bool | Sequence[int] = False,
) -> Labelled:
    """Direct logit attribution: each part of the final stream's contribution to a token's
    logit, a logit difference, or the output along any direction -- ``[component, batch, pos]``,
    one value per position (index ``pos`` yourself; ``.top(k, batch, pos)`` ranks them).

    A part ``c`` contributes ``(c - mean(c)) / scale · (w * u)`` = ``c · centre(w * u) / scale``
    with ``ln_final``'s gain ``w``, the final ``scale`` and the target direction ``u``. The
    last part, ``"ln_final.b"``, is the bias term ``b · u``. The law: the parts sum to the
    logit (difference) at every position, i.e. ``ln_final(final_stream) @ u``.

    >>> dla = cache.logit_attribution(" Paris")
    >>> dla.sum()[0, -1]               # == logits[0, -1, paris]
    """
    model = cache.model
    ref = next((t for t in cache.values() if t.is_floating_point()), None)  # not token ids
    if ref is None:
        raise KeyError("this cache is empty: run_with_cache(..., names_filter=None) caches enough")
    u = unembed_direction(model, target, ref.shape[0]).to(ref)
    rms = model.cfg.normalization in ("RMS", "RMSPre")  # no centring, no bias
    direction = readout_direction(model, u)
    parts = contributions(
        cache, None, "final", heads=heads, per_neuron=per_neuron, direction=direction
    )
    values = parts.components / final_scale(cache)[None, ..., 0]
    if rms:  # and has no bias
        return Labelled.stack(parts.labels, values, parts.site)
    b_term = (u @ model.ln_final.b.detach().to(ref))[None, :, None].expand(1, *values.shape[1:])
    return Labelled.stack([*parts.labels, "ln_final.b"], torch.cat([values, b_term]), parts.site)
