"""ActivationCache: what ``run_with_cache`` kept, by hook name, and nothing else.

>>> logits, cache = model.run_with_cache("Hello world")
>>> cache["blocks.0.hook_resid_pre"].shape
torch.Size([1, 3, 768])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from einops import einsum
from jaxtyping import Bool, Float
from torch import Tensor

from resid.core.hooks import unknown_hook_error
from resid.core.names import act_name, locate
from resid.core.stream import ResidualStream

if TYPE_CHECKING:
    from resid.core.model import Model


class ActivationCache(Mapping[str, Tensor]):
    def __init__(
        self,
        store: dict[str, Tensor],
        model: Model,
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
