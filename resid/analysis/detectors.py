"""Head detectors: how much of each head's attention follows a known pattern.

Each score is an attention mass in [0, 1], averaged over the batch and over the query
positions where the pattern is defined:

- ``previous_token``: the mass on position ``q - 1``;
- ``bos``: the mass on position 0;
- ``duplicate_token``: the mass on earlier positions holding the same token as ``q``;
- ``induction``: the mass on positions just after an earlier copy of token ``q``
  (attend to ``k`` where ``tokens[k - 1] == tokens[q]``, ``k <= q``) -- Olsson et al. 2022.

>>> tokens = repeated_tokens(batch=4, seq_len=20, d_vocab=model.cfg.d_vocab)
>>> scores = head_scores(model, tokens)
>>> scores["induction"].shape          # [n_layers, n_heads]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from resid.core.model import Model

Pattern = Float[Tensor, "batch head query_pos key_pos"]


def _masked_mean(pattern: Pattern, where: Tensor) -> Float[Tensor, " head"]:
    """Mean over (batch, query) of the attention mass on the keys ``where`` marks.

    ``where`` is ``[batch, query_pos, key_pos]``; queries with no marked key are left out."""
    mass = (pattern * where[:, None].to(pattern.dtype)).sum(-1)  # [batch, head, query]
    defined = where.any(-1)[:, None].expand_as(mass)
    return (mass * defined).sum((0, 2)) / defined.sum((0, 2)).clamp(min=1)


def previous_token_score(pattern: Pattern) -> Float[Tensor, " head"]:
    q = pattern.shape[-1]
    where = torch.eye(q, dtype=torch.bool, device=pattern.device).roll(-1, dims=1).tril(-1)
    return _masked_mean(pattern, where.expand(pattern.shape[0], q, q))


def bos_score(pattern: Pattern) -> Float[Tensor, " head"]:
    return pattern[..., 0].mean((0, 2))


def duplicate_token_score(
    pattern: Pattern, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, " head"]:
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, query, key]
    return _masked_mean(pattern, same.tril(-1))


def induction_score(pattern: Pattern, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " head"]:
    after_copy = torch.zeros_like(tokens[:, :, None] == tokens[:, None, :])
    after_copy[:, :, 1:] = tokens[:, :, None] == tokens[:, None, :-1]  # tokens[k-1] == tokens[q]
    return _masked_mean(pattern, after_copy.tril(0))


@torch.no_grad()
def head_scores(
    model: Model, tokens: Int[Tensor, "batch pos"]
) -> dict[str, Float[Tensor, "layer head"]]:
    """Every detector's score for every head of ``model`` on ``tokens``."""
    tokens = model.tokens(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    rows: dict[str, list[Tensor]] = {
        "previous_token": [],
        "bos": [],
        "duplicate_token": [],
        "induction": [],
    }
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].float()
        rows["previous_token"].append(previous_token_score(p))
        rows["bos"].append(bos_score(p))
        rows["duplicate_token"].append(duplicate_token_score(p, tokens))
        rows["induction"].append(induction_score(p, tokens))
    return {name: torch.stack(r) for name, r in rows.items()}


def repeated_tokens(
    batch: int, seq_len: int, d_vocab: int, bos: int | None = 50256, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """``[BOS] + r + r`` for a random sequence ``r`` of ``seq_len`` tokens: the standard
    probe for induction heads (the second copy is predictable only by copying)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, min(d_vocab, 50256), (batch, seq_len), generator=g)
    parts = [r, r] if bos is None else [torch.full((batch, 1), bos), r, r]
    return torch.cat(parts, dim=1)
