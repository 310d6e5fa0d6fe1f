"""A key-value cache: every layer's keys and values for the positions run so far, so that
a forward can run the next positions without recomputing the prefix (generation), as
TransformerLens' ``HookedTransformerKeyValueCache``.

>>> cache = KVCache(model)
>>> logits = model(prompt_tokens, past_kv_cache=cache)          # prefill: cache.length == pos
>>> logits = model(next_token[:, None], past_kv_cache=cache)    # one more position

Hooks fire on every forward, each seeing only that forward's new positions.

A forward changes the cache all or nothing: each layer's new keys and values are staged
while the forward runs and kept only when the whole forward returns. A forward that raises
part-way (a hook's error, Ctrl-C) leaves the cache exactly as it was, so the next forward
gives what it would have given without the failed one. Staging holds references to the
tensors the layers built anyway: no copy of the cache is made to undo a forward.

A cache refuses what does not fit it, with an error naming both sides: a model of other
shapes (layers, key/value heads, ``d_head``, dtype, device) than the one that filled it,
another batch size, and ``start_at_layer`` / ``stop_at_layer`` (which run only some
layers, so the others would miss the new positions) unless the cache is frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from jaxtyping import Bool
from torch import Tensor

from resid.core.layers import KVStore
from resid.core.protocols import ModelLike


class Shapes(NamedTuple):
    """What a cache's keys and values are made of: the model's layers, key/value heads,
    head width, dtype and device (a cache filled by one model fits only models alike)."""

    n_layers: int
    kv_heads: int
    d_head: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: ModelLike) -> Shapes:
        """The shapes ``model`` writes into a cache.

        >>> Shapes.of(model)   # Shapes(n_layers=12, kv_heads=12, d_head=64, ...)
        """
        c = model.cfg
        return cls(c.n_layers, c.kv_heads, c.d_head, model.dtype, model.device)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.n_layers} layers, {self.kv_heads} key/value heads of d_head {self.d_head}, "
            f"{dtype} on {self.device}"
        )


class KVCache:
    """Keys and values ``[batch, pos, head, d_head]`` per layer, and which of the cached
    positions are real tokens (``mask``; ``None`` while none is padding).

    >>> cache = KVCache(model)
    >>> model(tokens, past_kv_cache=cache); cache.length    # tokens.shape[1]
    """

    def __init__(self, model: ModelLike, batch: int | None = None):
        self.layers = [KVStore() for _ in range(model.cfg.n_layers)]
        self.n_layers, self.batch = model.cfg.n_layers, batch
        self.length = 0
        self.mask: Bool[Tensor, "batch pos"] | None = None
        self.frozen = False  # see freeze()
        self.shapes: Shapes | None = None  # of the model that filled it, once filled

    def check(
        self,
        model: ModelLike,
        batch: int,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
    ) -> None:
        """Refuse a forward that does not fit this cache, before anything runs: a model of
        other shapes than the one that filled it, another batch size, or (unless frozen) a
        forward that runs only some layers."""
        shapes = Shapes.of(model)
        if len(self.layers) != shapes.n_layers or (
            self.shapes is not None and self.shapes != shapes
        ):
            have = self.shapes or f"{len(self.layers)} layers"
            raise ValueError(
                f"this KVCache holds keys and values of a model with {have}; this model has "
                f"{shapes}: make one for it with KVCache(model)"
            )
        if self.batch is not None and self.batch != batch:
            raise ValueError(
                f"this KVCache holds {self.batch} rows, the input has {batch}: one cache per batch"
            )
        ran = range(shapes.n_layers)[start_at_layer:stop_at_layer]
        if len(ran) != shapes.n_layers and not self.frozen:
            raise ValueError(
                f"start_at_layer={start_at_layer}, stop_at_layer={stop_at_layer} run layers "
                f"{list(ran)} only, so the other layers' caches would miss these positions: "
                "run every layer with past_kv_cache, or freeze the cache first (cache.freeze(): "
                "the forward then reads the cached positions and adds none)"
            )
        self._check_whole()

    def _check_whole(self) -> None:
        """Every layer holds exactly ``length`` positions (a cheap guard: a forward is
        all or nothing, so this fails only if the stores were edited by hand)."""
        for layer, store in enumerate(self.layers):
            held = 0 if store.k is None else store.k.shape[1]
            if held != self.length:
                raise ValueError(
                    f"this KVCache is inconsistent: layer {layer} holds {held} positions, the "
                    f"cache {self.length}; it cannot be used: make a new one with KVCache(model)"
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

    @contextmanager
    def extending(
        self,
        model: ModelLike,
        keys: Bool[Tensor, "batch key_pos"] | None,
        shape: tuple[int, int],
    ) -> Iterator[None]:
        """One forward of ``shape`` (``[batch, pos]``) against this cache: the layers stage
        their new keys and values inside the block; on a normal exit every layer keeps
        them and the cache records the positions (``keys`` is the mask over all of them);
        on any error, ``KeyboardInterrupt`` included, the staged ones are dropped and the
        cache is as it was. A frozen cache never changes.

        >>> with cache.extending(model, keys, tokens.shape):
        ...     resid = block(resid, mask, cache.layers[0])
        """
        for store in self.layers:  # nothing left staged from elsewhere
            store.discard()
        try:
            yield
        except BaseException:
            for store in self.layers:
                store.discard()
            raise
        self.advance(keys, shape, Shapes.of(model))

    def advance(
        self,
        keys: Bool[Tensor, "batch key_pos"] | None,
        shape: tuple[int, int],
        shapes: Shapes | None = None,
    ) -> None:
        """Keep what every layer staged and record that a forward of ``shape`` ran
        (unless the cache is frozen: then nothing changes)."""
        if self.frozen:
            return
        for store in self.layers:
            store.commit()
        self.batch = shape[0]
        self.length += shape[1]
        self.mask = keys
        if shapes is not None:
            self.shapes = shapes

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
