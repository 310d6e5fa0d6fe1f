"""ActivationCache: what ``run_with_cache`` kept, by hook name, and nothing else.

>>> logits, cache = model.run_with_cache("Hello world")
>>> cache["blocks.0.hook_resid_pre"].shape
torch.Size([1, 3, 768])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from resid.hooks import unknown_hook_error

if TYPE_CHECKING:
    from resid.decompose import Components
    from resid.model import Model
    from resid.stream import ResidualStream


class ActivationCache(Mapping[str, Tensor]):
    def __init__(self, store: dict[str, Tensor], model: Model):
        self._store = store
        self.model = model

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

    # ---- the residual stream (resid.stream, resid.decompose, resid.lens) -------------

    def stream(self, layer: int, where: str = "pre") -> ResidualStream:
        """The stream at ``blocks.{layer}.hook_resid_{where}`` as a labelled ResidualStream.

        >>> cache.stream(5, "mid").query(direction)     # [batch, pos]
        """
        from resid.stream import ResidualStream, locate

        site = locate(self.model.cfg.n_layers, layer, where)
        return ResidualStream(self[site.name], site.name, where=site.where, cache=self)

    def final_stream(self) -> ResidualStream:
        """The stream entering ``ln_final`` (the last block's ``hook_resid_post``)."""
        return self.stream(self.model.cfg.n_layers, "final")

    def decompose_resid(
        self,
        layer: int | None = None,
        where: str = "pre",
        heads: bool = True,
        per_neuron: bool | list[int] = False,
    ) -> Components:
        """The named parts that sum to the stream at ``(layer, where)`` (``None``: final):
        ``embed``, ``pos_embed``, each head ``L{l}H{h}`` (``z @ W_O``), each attention bias
        ``L{l}.b_O``, each MLP ``L{l}.mlp`` -- or, for the layers in ``per_neuron`` (``True``:
        all), each neuron ``L{l}N{i}`` and ``L{l}.b_out``. ``heads=False`` keeps each
        attention layer whole (``L{l}.attn``). ``components`` is
        ``[component, batch, pos, d_model]``; see ``resid.decompose``.

        >>> parts = cache.decompose_resid(3, "mid")
        >>> parts["L2H5"].shape                          # [batch, pos, d_model]
        """
        from resid.decompose import contributions

        return contributions(self, layer, where, heads=heads, per_neuron=per_neuron)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """Each layer's ``resid_pre`` up to ``layer``, then the final stream (TransformerLens'
        meaning); ``apply_ln`` recomputes ``ln_final`` on each. See ``resid.lens``."""
        from resid.lens import accumulated_resid

        return accumulated_resid(self, layer, incl_mid, apply_ln, return_labels)

    def logit_lens(
        self, layer: int | None = None, return_labels: bool = False
    ) -> Float[Tensor, "component batch pos d_vocab"] | tuple[Tensor, list[str]]:
        """``ln_final(stream) @ W_U`` for each accumulated stream, ``ln_final`` recomputed on
        each; the last entry equals the model's logits. See ``resid.lens``."""
        from resid.lens import logit_lens

        return logit_lens(self, layer, return_labels)

    def head_results(
        self, layer: int | None = None
    ) -> Float[Tensor, "batch pos head d_model"] | Float[Tensor, "layer batch pos head d_model"]:
        """What each head writes, ``[batch, pos, head, d_model]`` for one layer or
        ``[layer, batch, pos, head, d_model]`` for all: ``hook_result`` when cached, else
        computed from ``hook_z`` and ``W_O``."""
        from resid.decompose import head_results

        if layer is None:
            return torch.stack([head_results(self, lyr) for lyr in range(self.model.cfg.n_layers)])
        n = self.model.cfg.n_layers
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer must be in [0, {n}), not {layer!r}")
        return head_results(self, layer % n)

    def logit_attribution(
        self,
        target: int | str | tuple | Tensor,
        heads: bool = True,
        per_neuron: bool | list[int] = False,
    ) -> Components:
        """Direct logit attribution of every part of the final stream to a token, a logit
        difference ``(a, b)``, or a direction -- ``[component, batch, pos]`` with the last part
        ``"ln_final.b"``; the parts sum to the logit (difference). See ``resid.lens``.

        >>> cache.logit_attribution((" Mary", " John")).top(5, pos=-1)
        """
        from resid.lens import logit_attribution

        return logit_attribution(self, target, heads=heads, per_neuron=per_neuron)
