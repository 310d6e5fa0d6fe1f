"""ActivationCache: what ``run_with_cache`` kept, by hook name, and the readings of the
residual stream it allows, as methods with TransformerLens' names: ``stream``,
``head_results``, ``decompose_resid``, ``accumulated_resid``, ``logit_lens``,
``logit_attribution``.

There is one cache class. ``run_with_cache`` hands out this one, and one a user builds
from tensors (``ActivationCache({name: tensor}, model)``) has every method too: the
maths lives in ``resid.core.decompose`` and ``resid.core.lens``, which read any cache
through the ``CacheLike`` protocol.

>>> logits, cache = model.run_with_cache("Hello world")
>>> cache["blocks.0.hook_resid_pre"].shape
torch.Size([1, 3, 768])
>>> cache.decompose_resid(1, "mid").labels[:3]
['embed', 'pos_embed', 'L0H0']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from einops import einsum
from jaxtyping import Bool, Float
from torch import Tensor

from resid.core.decompose import contributions
from resid.core.hooks import unknown_hook_error
from resid.core.labelled import Labelled
from resid.core.lens import accumulated_resid, logit_attribution, logit_lens
from resid.core.names import act_name, locate
from resid.core.protocols import ModelLike
from resid.core.stream import ResidualStream


class ActivationCache(Mapping[str, Tensor]):
    """Activations by hook name (only those asked for), the model that made them and the
    run's attention mask (``True`` at real tokens; ``None`` when nothing is padding).

    >>> cache = ActivationCache({"blocks.0.hook_resid_pre": x}, model)
    >>> cache.stream(0, "pre").query(direction)      # [batch, pos]
    """

    def __init__(
        self,
        store: Mapping[str, Tensor],
        model: ModelLike,
        attention_mask: Bool[Tensor, "batch pos"] | None = None,
    ):
        self._store = store
        self.model = model
        self.attention_mask = attention_mask  # True at real tokens; None: no padding

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._store:
            if name in self.model.hook_dict:
                raise KeyError(f"'{name}' was not cached: add it to run_with_cache's names_filter")
            raise unknown_hook_error(name, self.model.hook_dict)
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites: {', '.join(list(self)[:4])}{', …' if len(self) > 4 else ''})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._store.values())

    # ---- the residual stream -----------------------------------------------------------

    def stream(self, layer: int, where: str = "pre") -> ResidualStream:
        """The stream at ``blocks.{layer}.hook_resid_{where}`` as a labelled ResidualStream.

        >>> cache.stream(5, "mid").query(direction)     # [batch, pos]
        """
        site = locate(self.model.cfg.n_layers, layer, where)
        return ResidualStream(self[site.name], site.name, where=site.where, cache=self)

    def final_stream(self) -> ResidualStream:
        """The stream entering ``ln_final`` (the last block's ``hook_resid_post``)."""
        return self.stream(self.model.cfg.n_layers, "final")

    def head_results(
        self, layer: int | None = None
    ) -> Float[Tensor, "batch pos head d_model"] | Float[Tensor, "layer batch pos head d_model"]:
        """What each head writes, ``[batch, pos, head, d_model]`` for one layer or
        ``[layer, batch, pos, head, d_model]`` for all: ``hook_result`` when cached, else
        computed from ``hook_z`` and ``W_O``."""
        n = self.model.cfg.n_layers
        if layer is None:
            return torch.stack([self.head_results(lyr) for lyr in range(n)])
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer must be in [0, {n}), not {layer!r}")
        layer %= n
        if act_name("result", layer) in self:
            return self[act_name("result", layer)]
        self.require(
            [act_name("z", layer)],
            f"the head results of layer {layer}",
            f"[..., {act_name('z', layer)!r}]",
        )
        z = self[act_name("z", layer)]
        W_O = self.model.blocks[layer].attn.W_O.detach().to(z)
        return einsum(
            z, W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"
        )

    def require(self, names: list[str], needed_for: str, fix: str) -> None:
        """Raise a KeyError naming the sites ``needed_for`` something that this cache lacks,
        and the ``names_filter`` (``fix``) that would have cached them."""
        missing = [n for n in names if n not in self]
        if missing:
            shown = ", ".join(missing[:6]) + (
                f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            )
            raise KeyError(
                f"{needed_for} needs hooks this cache lacks: {shown}. Cache them with "
                f"run_with_cache(..., names_filter={fix})"
            )

    # ---- readings of the stream (resid.core.decompose, resid.core.lens) ---------------

    def decompose_resid(
        self,
        layer: int | None = None,
        where: str = "pre",
        heads: bool = True,
        per_neuron: bool | list[int] = False,
        mask_padding: bool = False,
    ) -> Labelled:
        """The named parts that sum to the stream at ``(layer, where)`` (``None``: final):
        ``embed``, ``pos_embed``, each head ``L{l}H{h}`` (``z @ W_O``), each attention bias
        ``L{l}.b_O``, each MLP ``L{l}.mlp`` -- or, for the layers in ``per_neuron`` (``True``:
        all), each neuron ``L{l}N{i}`` and ``L{l}.b_out``. ``heads=False`` keeps each
        attention layer whole (``L{l}.attn``). ``components`` is
        ``[component, batch, pos, d_model]``; see ``resid.core.decompose``.

        >>> parts = cache.decompose_resid(3, "mid")
        >>> parts["L2H5"].shape                          # [batch, pos, d_model]
        """
        parts = contributions(self, layer, where, heads=heads, per_neuron=per_neuron)
        return self._masked(parts, mask_padding)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """Each layer's ``resid_pre`` up to ``layer``, then the final stream (TransformerLens'
        meaning); ``apply_ln`` recomputes ``ln_final`` on each. See ``resid.core.lens``."""
        return accumulated_resid(self, layer, incl_mid, apply_ln, return_labels)

    def logit_lens(
        self, layer: int | None = None, return_labels: bool = False
    ) -> Float[Tensor, "component batch pos d_vocab"] | tuple[Tensor, list[str]]:
        """``ln_final(stream) @ W_U`` for each accumulated stream, ``ln_final`` recomputed on
        each; the last entry equals the model's logits. See ``resid.core.lens``."""
        return logit_lens(self, layer, return_labels)

    def logit_attribution(
        self,
        target: int | str | tuple | Tensor,
        heads: bool = True,
        per_neuron: bool | list[int] = False,
        mask_padding: bool = False,
    ) -> Labelled:
        """Direct logit attribution of every part of the final stream to a token, a logit
        difference ``(a, b)``, or a direction -- ``[component, batch, pos]`` with the last part
        ``"ln_final.b"``; the parts sum to the logit (difference). See ``resid.core.lens``.
        ``mask_padding=True`` zeroes every part at padding positions (as does
        ``decompose_resid``'s), so sums and rankings over positions see real tokens only.

        >>> cache.logit_attribution((" Mary", " John")).top(5, pos=-1)
        """
        parts = logit_attribution(self, target, heads=heads, per_neuron=per_neuron)
        return self._masked(parts, mask_padding)

    def _masked(self, parts: Labelled, mask_padding: bool) -> Labelled:
        """``parts`` with every padding position zeroed, when asked and there is padding."""
        if not mask_padding or self.attention_mask is None:
            return parts
        real = self.attention_mask.to(parts.values.device)  # [batch, pos]
        shape = (1, *real.shape) + (1,) * (parts.values.dim() - 3)
        values = parts.values * real.view(shape).to(parts.values.dtype)
        return Labelled(values, parts.axes, parts.names, parts.site, parts.baseline)
