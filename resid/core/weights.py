"""Views of a model's weights under TransformerLens' names: every layer's matrices stacked
on a leading layer axis (``model.W_Q``: ``[layer, head, d_model, d_head]``), the
unembedding, every head's QK and OV circuits as factored matrices, and single heads and
neurons. :class:`WeightViews` is the part of ``resid.Model`` that gives them; the
matrices themselves live in the blocks (``resid.core.layers``).

>>> model.W_O.shape                  # [n_layers, n_heads, d_head, d_model]
>>> model.OV[5, 1].svd()             # head L5H1's OV circuit, factored
>>> model.head(5, 1).full_ov.shape   # [d_vocab, d_vocab] (factored)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core import stacking
from resid.core.factored import FactoredMatrix
from resid.core.head import Head
from resid.core.hooks import HookPoint
from resid.core.neuron import Neuron
from resid.core.protocols import ModelLike


def _stacked(module: str, name: str, shape: str) -> property:
    """A ``Model`` property: every block's ``module.name``, stacked on a leading layer axis.
    Keys and values are given per query head, so with grouped-query attention the heads
    that share one appear once each (a copy, as the whole stack is)."""

    def get(self: ModelLike) -> Tensor:
        parts = []
        for block in self.blocks:
            t = getattr(getattr(block, module), name)
            if name in ("W_K", "W_V", "b_K", "b_V"):
                t = t[[block.attn.kv_head(h) for h in range(self.cfg.n_heads)]]
            parts.append(t.to(self.device))  # blocks on several devices: on the first
        return torch.stack(parts)

    return property(get, doc=f"``[{shape}]``: each block's ``{module}.{name}``, stacked (a copy).")


class HeadLabels(list):
    """A list of head labels that returns itself when called (see ``all_head_labels``)."""

    def __call__(self) -> list[str]:
        return list(self)


class WeightViews:
    """Weight views for ``resid.Model`` (a mixin: it reads the model's ``W_E``, ``blocks``
    and ``cfg``)."""

    hook_dict: dict[str, HookPoint]

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding: tied to the embedding (GPT-2), a view of ``W_E``; else its own
        matrix (``lm_head``, stored ``[d_model, d_vocab]``)."""
        return self.W_E.T if self.cfg.tie_embeddings else self.lm_head

    @property
    def hook_names(self) -> list[str]:
        """Every hook site's name, in the order the forward pass reaches them."""
        return list(self.hook_dict)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.W_E.dtype

    # ---- heads, neurons, and every layer's weights stacked (TransformerLens' names) -----

    def head(self, layer: int, index: int) -> Head:
        """Attention head ``index`` of block ``layer``: weights, QK/OV circuits, pattern."""
        return Head(self, layer, index)

    def neuron(self, layer: int, index: int) -> Neuron:
        """MLP neuron ``index`` of ``layer``: ``.read``, ``.write``, ``.bias``,
        ``.activation(...)``, ``.logit_effect()``; see ``resid.core.neuron``."""
        return Neuron(self, layer, index)

    W_Q = _stacked("attn", "W_Q", "layer head d_model d_head")
    W_K = _stacked("attn", "W_K", "layer head d_model d_head")
    W_V = _stacked("attn", "W_V", "layer head d_model d_head")
    W_O = _stacked("attn", "W_O", "layer head d_head d_model")
    b_Q = _stacked("attn", "b_Q", "layer head d_head")
    b_K = _stacked("attn", "b_K", "layer head d_head")
    b_V = _stacked("attn", "b_V", "layer head d_head")
    b_O = _stacked("attn", "b_O", "layer d_model")
    W_in = _stacked("mlp", "W_in", "layer d_model d_mlp")
    W_out = _stacked("mlp", "W_out", "layer d_mlp d_model")
    b_in = _stacked("mlp", "b_in", "layer d_mlp")
    b_out = _stacked("mlp", "b_out", "layer d_model")

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's ``W_Q W_Kᵀ``, factored: ``[layer, head, d_model, d_model]`` (refused
        for rotary models, whose QK depends on position: see ``Head.qk_at``)."""
        if self.cfg.positional == "rotary":
            raise ValueError(
                "a rotary model's QK circuits depend on the query-key distance: use "
                "model.head(layer, h).qk_at(offset)"
            )
        return FactoredMatrix(self.W_Q, self.W_K.mT)

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's ``W_V W_O``, factored: ``[layer, head, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    # ---- TransformerLens' conveniences ----------------------------------------------------

    @property
    def all_head_labels(self) -> HeadLabels:
        """``"L{l}H{h}"`` for every head, layer by layer (TransformerLens' labels): a list,
        which may also be called (``model.all_head_labels()``, TransformerLens 2's spelling;
        TransformerLens 4 makes it a property)."""
        n, h = self.cfg.n_layers, self.cfg.n_heads
        return HeadLabels(f"L{lyr}H{i}" for lyr in range(n) for i in range(h))

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """The biases written to the stream before ``layer`` (each ``b_O``, each ``b_out``);
        see ``resid.core.stacking.accumulated_bias``.

        >>> model.accumulated_bias(3, mlp_input=True)
        """
        return stacking.accumulated_bias(self, layer, mlp_input, include_mlp_biases)

    def tokens_to_residual_directions(
        self, tokens: str | int | Tensor
    ) -> Float[Tensor, "... d_model"]:
        """The unembedding direction of each token (``W_U[:, t]``): ``[d_model]`` for one
        token (a one-token string or an id), ``[..., d_model]`` for a tensor of ids.

        >>> model.tokens_to_residual_directions(" Paris") @ final_state   # the logit, less b_U
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, device=self.W_E.device)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"tokens are ids (integers) or a one-token string, not {ids.dtype}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.cfg.d_vocab):
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab})")
        return self.W_U[:, ids].movedim(0, -1)
