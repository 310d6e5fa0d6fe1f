"""Batches of rows cut from streams of pieces: what every training data source does once
its streams yield pieces of rows (rows in memory, a harvest's shards, a model run on the
fly). A piece is a tuple of tensors with the same number of rows (one per site).

>>> batches = joined([rebatch(pieces_a, 256), rebatch(pieces_b, 256)], width=1)  # 512 a step
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor


def rebatch(pieces: Iterable[tuple[Tensor, ...]], rows: int) -> Iterator[tuple[Tensor, ...]]:
    """Exactly ``rows`` rows at a time from pieces of any length, in order, the rows left
    over from one piece carried into the next batch.

    >>> [len(b[0]) for b in itertools.islice(rebatch(iter(pieces), 4), 3)]
    [4, 4, 4]
    """
    held: list[tuple[Tensor, ...]] = []
    have = 0
    for piece in pieces:
        held.append(piece)
        have += len(piece[0])
        while have >= rows:
            whole = tuple(torch.cat([p[i] for p in held]) for i in range(len(piece)))
            yield tuple(t[:rows] for t in whole)
            held, have = [tuple(t[rows:] for t in whole)], have - rows


def joined(
    streams: Sequence[Iterator[tuple[Tensor, ...]]], width: int
) -> Iterator[tuple[Tensor, ...]]:
    """One batch from each stream, concatenated in stream order, for ever (``width``
    tensors a batch).

    >>> x, = next(joined([rebatch(a, 256), rebatch(b, 256)], width=1))   # [512, d]
    """
    while True:
        got = [next(it) for it in streams]
        yield tuple(torch.cat([g[i] for g in got]) for i in range(width))


__all__ = ["joined", "rebatch"]
