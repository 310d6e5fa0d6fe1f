"""Training data for SAEs: a harvest's stored activations at one site, streamed shuffled in
batches, with bounded memory.

>>> store = ActivationStore("harvest", "blocks.5.hook_resid_pre", batch_size=4096, seed=0)
>>> for x in store:          # x: [4096, d_model] (the last batch may be shorter)
...     loss = sae_loss(sae, x)
>>> len(store)                # rows (tokens) in one epoch

Each epoch visits every stored row exactly once: the shards are taken in a seeded random
order, ``buffer_shards`` at a time, and the rows of those shards are shuffled together.
Each shard is read through :mod:`resid.harvest.store` (confined to the harvest folder, a
regular file, checked against the SHA-256 in the harvest's manifest) before use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from resid.harvest import store
from resid.harvest.errors import HarvestError


class ActivationStore:
    """Shuffled batches ``[batch_size, units]`` of one site's stored activations.

    >>> store = ActivationStore("h", "blocks.5.hook_resid_pre", batch_size=4096)
    >>> next(iter(store)).shape   # [4096, d_model]
    """

    def __init__(
        self,
        folder: str | Path,
        site: str,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.folder = Path(folder)
        info = store.read_activations(self.folder, [site])
        for name, value in (("batch_size", batch_size), ("buffer_shards", buffer_shards)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 30:
                raise ValueError(f"{name} must be an int in [1, 2^30], not {value!r}")
        self.site, self.batch_size, self.shuffle = site, batch_size, shuffle
        self.seed, self.buffer_shards, self.dtype, self.device = seed, buffer_shards, dtype, device
        self.shards = [s["path"] for s in info["shards"]]
        self.rows = sum(int(s["rows"]) for s in info["shards"])
        self.listed = store.read_manifest(self.folder)["files"]
        self.epoch = 0

    def __len__(self) -> int:
        return self.rows

    def _load(self, rel: str) -> Tensor:
        shard = store.load_shard(self.folder, rel, self.listed)
        if self.site not in shard:
            raise HarvestError(f"{self.folder / rel} holds no activations at {self.site!r}")
        return shard[self.site]

    def __iter__(self) -> Iterator[Float[Tensor, "batch units"]]:
        """One epoch (a new shuffle each time it is iterated)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.shards), generator=g).tolist() if self.shuffle else None
        names = [self.shards[i] for i in order] if order else self.shards
        carry: Tensor | None = None
        for start in range(0, len(names), self.buffer_shards):
            rows = torch.cat([self._load(n) for n in names[start : start + self.buffer_shards]])
            if self.shuffle:
                rows = rows[torch.randperm(len(rows), generator=g)]
            if carry is not None:
                rows = torch.cat([carry, rows])
            full = len(rows) // self.batch_size * self.batch_size
            for i in range(0, full, self.batch_size):
                yield rows[i : i + self.batch_size].to(self.device, self.dtype)
            carry = rows[full:]
        if carry is not None and len(carry):
            yield carry.to(self.device, self.dtype)
