"""Which keys the queries of one forward pass may attend to, and the queries' positions:
the one mask every block of a pass shares, and what the blocks derive from it alike (the
allowed keys, the rotary angles), computed once a pass.

>>> mask = Mask(offset=0, keys=attention_mask.bool(), memo={})
>>> mask.positions(5, torch.device("cpu"))          # [batch, 5]: real tokens before each
>>> mask.allowed(5, 5, torch.device("cpu"))         # [batch, 1, 5, 5]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from jaxtyping import Bool, Int
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Mask:
    """Which keys the queries of one forward may attend to, and the queries' positions.

    ``offset`` is the position of the first query in the whole sequence (the length of a
    KV cache before it); ``keys`` marks the real (non-padding) keys, past and new, per row
    (``None``: all real). With neither, attention is plainly causal. ``memo``: a dict that
    keeps what every block derives alike (the allowed keys, the rotary angles), so that one
    forward pass computes each once, not once a block (``Model.forward`` gives each pass a
    fresh one; ``None``: nothing kept).
    """

    offset: int = 0
    keys: Bool[Tensor, "batch key_pos"] | None = None
    memo: dict | None = field(default=None, compare=False, repr=False)

    def derived(self, key: tuple, make: Callable[[], T]) -> T:
        """``make()``, computed once per ``key`` for this mask when it keeps a memo."""
        if self.memo is None:
            return make()
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    @property
    def causal_only(self) -> bool:
        return self.offset == 0 and self.keys is None

    def positions(self, n_q: int, device: torch.device) -> Int[Tensor, "*batch pos"]:
        """The position of each new query: its index, or with padding the number of real
        tokens before it in its row (Hugging Face's ``position_ids``)."""
        if self.keys is None:
            return torch.arange(self.offset, self.offset + n_q, device=device)
        return (self.keys.long().cumsum(1) - 1).clamp(min=0)[:, -n_q:].to(device)

    def allowed(
        self, n_q: int, n_k: int, device: torch.device, window: int | None = None
    ) -> Bool[Tensor, "batch 1 q k"]:
        """``allowed[b, 0, i, j]``: query ``i`` may read key ``j`` (within ``window``
        positions of it, if given). Every query may read itself, so a padding query attends
        somewhere and never yields NaN."""
        q = torch.arange(self.offset, self.offset + n_q, device=device)[:, None]
        k = torch.arange(n_k, device=device)[None]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        allowed = allowed[None, None]
        if self.keys is not None:
            allowed = (allowed & self.keys[:, None, None, :].to(device)) | (k == q)
        return allowed


CAUSAL = Mask()  # plainly causal, every key real, nothing kept: the blocks' default

__all__ = ["CAUSAL", "Mask"]
