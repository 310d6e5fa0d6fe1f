"""A key-value cache: every layer's keys and values for the positions run so far, so that
a forward can run the next positions without recomputing the prefix (generation), as
TransformerLens' ``HookedTransformerKeyValueCache``.

>>> cache = KVCache(model)
>>> logits = model(prompt_tokens, past_kv_cache=cache)          # prefill: cache.length == pos
>>> logits = model(next_token[:, None], past_kv_cache=cache)    # one more position

Hooks fire on every forward, each seeing only that forward's new positions.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from resid.core.layers import KVStore
from resid.core.protocols import ModelLike


class KVCache:
    """Keys and values ``[batch, pos, head, d_head]`` per layer, and which of the cached
    positions are real tokens (``mask``; ``None`` while none is padding)."""

    def __init__(self, model: ModelLike, batch: int | None = None):
        self.layers = [KVStore() for _ in range(model.cfg.n_layers)]
        self.n_layers, self.batch = model.cfg.n_layers, batch
        self.length = 0
        self.mask: Bool[Tensor, "batch pos"] | None = None
        self.frozen = False  # see freeze()

    def check(self, model: ModelLike, batch: int) -> None:
        if len(self.layers) != model.cfg.n_layers:
            raise ValueError(
                f"this KVCache has {len(self.layers)} layers, the model {model.cfg.n_layers}: "
                "make one with KVCache(model)"
            )
        if self.batch is not None and self.batch != batch:
            raise ValueError(
                f"this KVCache holds {self.batch} rows, the input has {batch}: one cache per batch"
            )

    def keys_mask(
        self, new: Bool[Tensor, "batch pos"] | None, shape: tuple[int, int]
    ) -> Bool[Tensor, "batch key_pos"] | None:
        """The mask over every key the next forward sees: the cached ones, then the new."""
        if self.mask is None and new is None:
            return None
        batch, pos = shape
        device = (new if new is not None else self.mask).device
        past = self.mask
        if past is None:
            past = torch.ones(batch, self.length, dtype=torch.bool, device=device)
        if new is None:
            new = torch.ones(batch, pos, dtype=torch.bool, device=device)
        return torch.cat([past, new], 1)

    def advance(self, keys: Bool[Tensor, "batch key_pos"] | None, shape: tuple[int, int]) -> None:
        """Record that a forward of ``shape`` ran (its keys and values are already stored,
        unless the cache is frozen: then nothing changes)."""
        if self.frozen:
            return
        self.batch = shape[0]
        self.length += shape[1]
        self.mask = keys

    def freeze(self) -> None:
        """Stop extending: later forwards read the cached keys and values but do not add
        theirs (TransformerLens' ``freeze``), so one prefix serves many continuations.

        >>> cache.freeze(); a = model(x, past_kv_cache=cache); b = model(y, past_kv_cache=cache)
        """
        self.frozen = True
        for store in self.layers:
            store.frozen = True

    def unfreeze(self) -> None:
        """Extend with each forward again."""
        self.frozen = False
        for store in self.layers:
            store.frozen = False

    def __repr__(self) -> str:
        return f"KVCache({self.n_layers} layers, {self.length} positions, batch={self.batch})"
