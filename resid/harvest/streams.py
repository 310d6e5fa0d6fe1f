"""A harvest's stored activations as ``n`` independent, endless, seeded streams: the data
of distributed SAE training (``resid.sae.training``).

The shards are dealt to the streams once (shard ``i`` to stream ``i % n``); each stream
goes through its shards epoch after epoch, ``buffer_shards`` shards at a time in a seeded
order, their rows shuffled together. A global batch of ``B`` rows is ``B / n`` rows of
every stream, in stream order, whatever the number of processes: a rank that trains on
streams ``r * n / world ... (r + 1) * n / world`` reads only their shards, and two ranks see
exactly the rows one rank sees. Every shuffle draws from a generator seeded by
``(seed, stream, epoch, buffer)``, so a stream restarts at any row without reading what
comes before it (``--resume``).

>>> data = HarvestStreams("h", ["blocks.5.hook_resid_pre"], streams=4, seed=0)
>>> batches = data.batches(range(2, 4), rows=1024, start=0)   # streams 2 and 3 (rank 1 of 2)
>>> (x,) = next(batches)                                       # [2048, d_model]

Each shard is read through :mod:`resid.harvest.store` (confined to the folder, a regular
file, checked against the SHA-256 in the manifest) before use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.rows import joined, rebatch
from resid.core.seeds import generator
from resid.harvest import store
from resid.harvest.errors import HarvestError

MAX_STREAMS = 1 << 16


class HarvestStreams:
    """One or more sites of a finished harvest (the same rows of each: an SAE reads one site,
    a transcoder its input and output sites) as ``streams`` endless shuffled streams.

    >>> data = HarvestStreams("h", ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"], 2)
    >>> x, y = next(data.batches(range(2), rows=512, start=0))     # [1024, d] each
    """

    def __init__(
        self,
        folder: str | Path,
        sites: Sequence[str],
        streams: int,
        seed: int = 0,
        buffer_shards: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.folder = Path(folder)
        self.sites = tuple(sites)
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites must name one or more distinct sites, not {list(sites)}")
        info = store.read_activations(self.folder, self.sites)
        for name, value, top in (
            ("streams", streams, MAX_STREAMS),
            ("buffer_shards", buffer_shards, 1 << 20),
            ("seed", seed, 1 << 62),
        ):
            low = 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
                raise ValueError(f"{name} must be an int in [{low}, {top}], not {value!r}")
        shards = [s for s in info["shards"] if s["rows"] > 0]
        if streams > len(shards):
            raise HarvestError(
                f"{folder} has {len(shards)} shard(s) with activations, too few for {streams} "
                f"streams: pass --streams {len(shards)} or fewer (or harvest again with a smaller "
                "--shard-batches for more shards)"
            )
        self.streams, self.seed, self.buffer_shards = streams, seed, buffer_shards
        self.dtype, self.device = dtype, device
        self.parts = [shards[i::streams] for i in range(streams)]
        self.listed = store.read_manifest(self.folder)["files"]
        self.tokens = sum(s["rows"] for s in shards)
        self.run_id = info.get("run_id")
        self._has_stats = bool(info.get("site_info"))
        first = self._load(shards[0])
        self.widths = tuple(int(t.shape[1]) for t in first)
        self._first = first

    def _load(self, shard: dict) -> tuple[Tensor, ...]:
        """A shard's rows at every site, checked against the manifest's row count."""
        data = store.load_shard(self.folder, shard["path"], self.listed)
        out = []
        for site in self.sites:
            t = data.get(site)
            if t is None or t.dim() != 2 or len(t) != shard["rows"]:
                got = tuple(t.shape) if t is not None else "missing"
                raise HarvestError(
                    f"{self.folder / shard['path']} holds {got} at {site!r}, not the "
                    f"{shard['rows']} rows its manifest says: harvest again"
                )
            out.append(t)
        return tuple(out)

    def mean(self) -> tuple[Tensor, ...]:
        """Each site's mean activation (the harvest's statistics; without them, the first
        shard's mean): where a decoder bias starts."""
        if self._has_stats:
            return tuple(store.load_stats(self.folder, s)["mean"].float() for s in self.sites)
        return tuple(t.double().mean(0).float() for t in self._first)

    def identity(self) -> dict:
        """What a resumed run must find again: the harvest's run id, sites and tokens."""
        return {"harvest_run_id": self.run_id, "sites": list(self.sites), "tokens": self.tokens}

    def _stream(self, s: int, start: int) -> Iterator[tuple[Tensor, ...]]:
        """Stream ``s`` from its row ``start`` on, in pieces (one per buffer)."""
        parts = self.parts[s]
        total = sum(p["rows"] for p in parts)
        epoch, skip = divmod(start, total)
        while True:
            order = torch.randperm(len(parts), generator=generator(self.seed, s, epoch)).tolist()
            for b in range(0, len(order), self.buffer_shards):
                chunk = [parts[i] for i in order[b : b + self.buffer_shards]]
                n = sum(p["rows"] for p in chunk)
                if skip >= n:
                    skip -= n
                    continue
                loaded = [self._load(p) for p in chunk]
                perm = torch.randperm(n, generator=generator(self.seed, s, epoch, b + 1))[skip:]
                skip = 0
                yield tuple(
                    torch.cat([ld[i] for ld in loaded])[perm] for i in range(len(self.sites))
                )
            epoch += 1

    def batches(
        self, streams: range, rows: int, start: int
    ) -> Iterator[tuple[Float[Tensor, "batch units"], ...]]:
        """Endless batches of ``rows`` rows from each stream in ``streams`` (joined in stream
        order), from step ``start`` on (``start * rows`` rows into every stream).

        >>> (x,) = next(data.batches(range(4), rows=256, start=100))   # [1024, units]
        """
        if not isinstance(rows, int) or not 1 <= rows <= 1 << 30:
            raise ValueError(f"rows must be an int in [1, 2^30], not {rows!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a step >= 0, not {start!r}")
        its = [rebatch(self._stream(s, start * rows), rows) for s in streams]
        for batch in joined(its, len(self.sites)):
            yield tuple(t.to(self.device, self.dtype) for t in batch)
