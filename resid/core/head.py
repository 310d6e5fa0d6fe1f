"""Head: one attention head, as the two circuits it is made of.

A head *queries* the residual stream with its QK circuit (which positions to read from)
and *updates* it with its OV circuit (what to write, given what it read). With the
right-multiplication convention stated in ``resid/model.py`` (activations are rows,
``x @ W``), for the ln1 output ``x: [pos, d_model]`` of one sequence:

    scores  = (x W_Q + b_Q)(x W_K + b_K)ᵀ / √d_head   =  x QK xᵀ / √d_head + bias terms
    output  = pattern (x W_V + b_V) W_O               =  pattern x OV + b_V W_O

where ``QK = W_Q W_Kᵀ`` and ``OV = W_V W_O`` are d_model × d_model matrices of rank
d_head, kept factored (``resid.core.factored.FactoredMatrix``). ``b_V W_O`` is added whole
because each pattern row sums to 1; ``b_O`` belongs to the layer, not to a head.

The *full* circuits read and write tokens: ``full_ov = W_E OV W_U`` (source token →
output logits) and ``full_qk = W_E QK W_Eᵀ`` (query token × key token), and
``pos_qk = W_pos QK W_posᵀ`` for positions. They use the raw weights, leaving out
LayerNorm and biases, as TransformerLens' full circuits do.

>>> head = model.head(1, 4)
>>> head.ov.svd()[1][:5]                 # top singular values of W_V W_O
>>> values, tokens = head.ov_top_k(k=5)  # each source token's 5 most-boosted output tokens
"""

from __future__ import annotations

import operator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from resid.core.factored import FactoredMatrix
from resid.core.names import act_name
from resid.core.protocols import CacheLike, ModelLike


class Head:
    """Attention head ``index`` of block ``layer``; its weights are views of the model's.

    >>> head = model.head(5, 1)
    >>> head.W_Q.shape, head.qk, head.full_ov   # [768, 64], rank-64 factored circuits
    """

    def __init__(self, model: ModelLike, layer: int, index: int):
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        layer, index = operator.index(layer), operator.index(index)  # ints only: no slices
        if not 0 <= layer < n_layers:
            raise IndexError(
                f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}"
            )
        if not 0 <= index < n_heads:
            raise IndexError(f"head {index} is out of range: each layer has heads 0..{n_heads - 1}")
        self.model, self.layer, self.index = model, layer, index
        self._attn = model.blocks[layer].attn

    def __repr__(self) -> str:
        return f"Head(layer={self.layer}, index={self.index})"

    # ---- weights: views of what the forward pass uses ---------------------------------

    @property
    def W_Q(self) -> Float[Tensor, "d_model d_head"]:
        return self._attn.W_Q[self.index]

    @property
    def kv_index(self) -> int:
        """The key/value head this head reads through. With grouped-query attention several
        query heads share one: their ``W_K``, ``W_V``, ``b_K``, ``b_V`` are the same views."""
        return self._attn.kv_head(self.index)

    @property
    def shares_kv_with(self) -> list[int]:
        """The query heads of this layer (itself included) that share its keys and values."""
        return [h for h in range(self.model.cfg.n_heads) if self._attn.kv_head(h) == self.kv_index]

    @property
    def W_K(self) -> Float[Tensor, "d_model d_head"]:
        return self._attn.W_K[self.kv_index]

    @property
    def W_V(self) -> Float[Tensor, "d_model d_head"]:
        return self._attn.W_V[self.kv_index]

    @property
    def W_O(self) -> Float[Tensor, "d_head d_model"]:
        return self._attn.W_O[self.index]

    @property
    def b_Q(self) -> Float[Tensor, " d_head"]:
        return self._attn.b_Q[self.index]

    @property
    def b_K(self) -> Float[Tensor, " d_head"]:
        return self._attn.b_K[self.kv_index]

    @property
    def b_V(self) -> Float[Tensor, " d_head"]:
        return self._attn.b_V[self.kv_index]

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        """The layer's output bias, shared by all its heads."""
        return self._attn.b_O

    # ---- circuits ----------------------------------------------------------------------

    @property
    def qk(self) -> FactoredMatrix:
        """``W_Q W_Kᵀ`` ``[d_model, d_model]``: ``x_q @ qk @ x_kᵀ`` is the bias-free score
        (before the attention scale). A rotary head has no such matrix: its scores depend
        on the distance between query and key, so this refuses; use ``qk_at(offset)``."""
        if self._attn.rotary is not None:
            raise ValueError(
                f"{self!r} rotates its queries and keys by position, so its QK circuit depends "
                "on the distance between them: use head.qk_at(offset) for query position - key "
                "position = offset"
            )
        return FactoredMatrix(self.W_Q, self.W_K.T)

    def qk_at(self, offset: int) -> FactoredMatrix:
        """The QK circuit for a query ``offset`` positions after its key (``offset >= 0``):
        ``W_Q R W_Kᵀ`` with ``R`` the rotation by ``offset`` positions, so that
        ``x_q @ qk_at(i - j) @ x_kᵀ`` is the bias-free score of query ``i`` and key ``j``
        (before the attention scale). Without rotary embeddings it is ``qk`` at every offset.

        >>> head.qk_at(3)     # a query three tokens after its key
        """
        if self._attn.rotary is None:
            return self.qk
        R = self._attn.rotary.matrix(operator.index(offset), self.model.cfg.d_head)
        return FactoredMatrix(self.W_Q @ R.to(self.W_Q), self.W_K.T)

    @property
    def ov(self) -> FactoredMatrix:
        """``W_V W_O`` ``[d_model, d_model]``: what the head writes for a read vector ``x``
        is ``x @ ov`` (plus ``b_V W_O``)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def full_qk(self) -> FactoredMatrix:
        """``W_E W_Q W_Kᵀ W_Eᵀ`` ``[d_vocab, d_vocab]``: query token × key token."""
        qk, W_E = self.qk, self.model.W_E  # a rotary head refuses: its QK depends on position
        return FactoredMatrix(W_E @ qk.A, qk.B @ W_E.T)

    @property
    def pos_qk(self) -> FactoredMatrix:
        """``W_pos W_Q W_Kᵀ W_posᵀ`` ``[n_ctx, n_ctx]``: query position × key position."""
        if self.model.cfg.positional != "learned":
            raise ValueError(f"{self!r}'s model has no position embedding W_pos (it is rotary)")
        qk, W_pos = self.qk, self.model.W_pos
        return FactoredMatrix(W_pos @ qk.A, qk.B @ W_pos.T)

    @property
    def full_ov(self) -> FactoredMatrix:
        """``W_E W_V W_O W_U`` ``[d_vocab, d_vocab]``: row ``s`` is how attending to source
        token ``s`` changes every output logit."""
        return FactoredMatrix(self.model.W_E @ self.W_V, self.W_O @ self.model.W_U)

    @torch.no_grad()
    def ov_top_k(
        self,
        k: int = 10,
        sources: Int[Tensor, " source"] | None = None,
        chunk: int = 512,
        largest: bool = True,
    ) -> tuple[Float[Tensor, "source k"], Int[Tensor, "source k"]]:
        """For each source token, the ``k`` output tokens whose logits the full OV circuit
        raises most (``largest=False``: lowers most), and by how much.

        Rows of ``full_ov`` are built ``chunk`` sources at a time, so memory is bounded by
        the block (``chunk × d_vocab`` floats: 100 MB at 512 × 50257) and ``topk``'s
        workspace on it, whatever the number of sources: all 50257 sources of GPT-2 small
        grow resident memory by ~280 MB. ``sources`` defaults to every token.

        >>> values, tokens = model.head(1, 4).ov_top_k(k=3, sources=model.to_tokens(" cat")[0, 1:])
        >>> model.to_str_tokens(tokens[0])
        """
        d_vocab = self.model.cfg.d_vocab
        if not 0 < k <= d_vocab:
            raise ValueError(f"k must be in 1..{d_vocab}, got {k}")
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of source tokens, got {chunk}")
        if sources is None:
            sources = torch.arange(d_vocab, device=self.model.device)
        sources = torch.as_tensor(sources, device=self.model.device).flatten()
        if sources.numel() and (sources.min() < 0 or sources.max() >= d_vocab):
            raise ValueError(f"source token ids must lie in [0, {d_vocab})")
        W_O_U = self.W_O @ self.model.W_U  # [d_head, d_vocab]: the only vocab-wide factor
        values, indices = [], []
        for start in range(0, len(sources), chunk):
            ids = sources[start : start + chunk]
            rows = (self.model.W_E[ids] @ self.W_V) @ W_O_U  # [chunk, d_vocab]
            top = rows.topk(k, dim=-1, largest=largest)
            values.append(top.values)
            indices.append(top.indices)
            del rows
        if not values:
            empty = W_O_U.new_empty(0, k)
            return empty, torch.empty(0, k, dtype=torch.long, device=empty.device)
        return torch.cat(values), torch.cat(indices)

    # ---- from a run ------------------------------------------------------------------

    def pattern(self, cache: CacheLike) -> Float[Tensor, "batch query_pos key_pos"]:
        """This head's attention pattern in a cached run (cache ``attn.hook_pattern``)."""
        return cache[act_name("pattern", self.layer)][:, self.index]
