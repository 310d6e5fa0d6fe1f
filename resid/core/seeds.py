"""Generators seeded by a key of integers: the same key gives the same numbers on any rank,
in any process, at any time, so a data stream (a training stream's order in an epoch, a
buffer's shuffle) can be drawn again exactly, to resume it or to split it over ranks.

>>> order = torch.randperm(10, generator=generator(seed, stream, epoch))
"""

from __future__ import annotations

import hashlib

import torch


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by the integers ``key`` (the same key, the same numbers).

    >>> torch.equal(torch.rand(3, generator=generator(0, 1)), torch.rand(3, generator=generator(0, 1)))
    True
    """
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


__all__ = ["generator"]
