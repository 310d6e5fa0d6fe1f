"""A harvest's work, cut up: contexts into chunks (the unit split across ranks and of
resumption) and chunks into padded, masked batches, each token with its global index.

>>> for number, chunk, fraction in chunks(corpus, model, settings):
...     for batch in batches(chunk, number, settings, pad=model.tokenizer.pad_token_id):
...         batch.tokens, batch.mask, batch.index      # [batch, pos] each
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from resid.harvest.corpus import Corpus, contexts
from resid.harvest.settings import Settings

if TYPE_CHECKING:
    from resid.core.model import Model


@dataclass
class Batch:
    """One forward's worth of contexts: ``tokens``, ``mask`` (real tokens) and ``index``
    (each token's global index, ``context * context_length + position``), all
    ``[batch, pos]``."""

    tokens: Tensor
    mask: Tensor
    index: Tensor


def chunks(
    corpus: Corpus, model: Model, settings: Settings
) -> Iterator[tuple[int, list[list[int]], float]]:
    """``(chunk number, its contexts, fraction read)``, the last chunk possibly short; stops
    at ``max_tokens`` real tokens (counted over whole contexts, the same on every rank)."""
    size = settings.batch_size * settings.shard_batches
    chunk: list[list[int]] = []
    number, seen, fraction = 0, 0, 0.0
    limit = settings.max_tokens
    for ids, fraction in contexts(corpus, model.tokenizer, settings.context_length, settings.mode):
        chunk.append(ids)
        seen += len(ids)
        if len(chunk) == size:
            yield number, chunk, fraction
            number, chunk = number + 1, []
        if limit is not None and seen >= limit:
            break
    if chunk:
        yield number, chunk, fraction


def batches(chunk: list[list[int]], number: int, settings: Settings, pad: int) -> Iterator[Batch]:
    """Chunk ``number``'s contexts as padded, masked batches of ``batch_size``."""
    size, length = settings.batch_size, settings.context_length
    first = number * settings.batch_size * settings.shard_batches
    for start in range(0, len(chunk), size):
        rows = chunk[start : start + size]
        width = max(map(len, rows))
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        ctx = torch.arange(first + start, first + start + len(rows))
        index = ctx[:, None] * length + torch.arange(width)
        yield Batch(tokens, mask, index)
