"""Head detectors: how much of each head's attention follows a known pattern.

Each score is an attention mass in [0, 1], averaged over the batch and over the query
positions where the pattern is defined:

- ``previous_token``: the mass on position ``q - 1``;
- ``bos``: the mass on position 0;
- ``duplicate_token``: the mass on earlier positions holding the same token as ``q``;
- ``induction``: the mass on positions just after an earlier copy of token ``q``
  (attend to ``k`` where ``tokens[k - 1] == tokens[q]``, ``k <= q``) -- Olsson et al. 2022.

Padding never counts: with an ``attention_mask`` positions are counted over each prompt's
real tokens (``q - 1`` is the previous real token, position 0 its first real token),
padding queries are not scored and padding keys are never a duplicate or a BOS. A padded
batch scores exactly as its prompts run alone, pooled over their scored queries.

>>> tokens = repeated_tokens(batch=4, seq_len=20, model=model)
>>> scores = head_scores(model, tokens)
>>> scores["induction"].values.shape          # [n_layers, n_heads]: a Labelled
>>> head_scores(model, ["Hi", "The cat sat. The cat sat."])   # padded and masked for you

``detect_head`` is TransformerLens' ``detect_head``: one score per head for a named or a
custom detection pattern, with its ``"mul"`` and ``"abs"`` error measures and its
``exclude_bos`` / ``exclude_current_token`` options.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from resid.core.inputs import Inputs
from resid.core.labelled import Labelled
from resid.core.names import act_name

if TYPE_CHECKING:
    from resid.core.cache import ActivationCache
    from resid.core.model import Model

Pattern = Float[Tensor, "batch head query_pos key_pos"]
Mask = Bool[Tensor, "batch pos"]
Where = Bool[Tensor, "batch query_pos key_pos"]

SCORES = ("previous_token", "bos", "duplicate_token", "induction")


def _real(tokens_or_pattern: Tensor, attention_mask: Tensor | None) -> tuple[Mask, Tensor]:
    """(real, rank): which positions are real tokens, and each one's index among them (the
    position it would have in its prompt run alone)."""
    batch, n = tokens_or_pattern.shape[0], tokens_or_pattern.shape[-1]
    device = tokens_or_pattern.device
    if attention_mask is None:
        real = torch.ones(batch, n, dtype=torch.bool, device=device)
    else:
        real = torch.as_tensor(attention_mask).to(device).bool()
        if tuple(real.shape) != (batch, n):
            raise ValueError(
                f"attention_mask has shape {tuple(real.shape)}, the pattern covers {(batch, n)} "
                "(batch, pos): give the mask of the run the pattern came from"
            )
    return real, real.long().cumsum(1) - 1


def _pairs(real: Mask) -> Where:
    """``[batch, query, key]``: both are real tokens and the key is not after the query."""
    n = real.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=real.device).tril()
    return real[:, :, None] & real[:, None, :] & causal


def _mass(pattern: Pattern, where: Where) -> tuple[Float[Tensor, "batch head"], Tensor]:
    """Per prompt: the summed attention mass on the keys ``where`` marks over the queries
    with at least one marked key, and the number of such queries ``[batch]``."""
    mass = (pattern * where[:, None].to(pattern.dtype)).sum(-1)  # [batch, head, query]
    defined = where.any(-1)  # [batch, query]
    return (mass * defined[:, None].to(mass.dtype)).sum(-1), defined.sum(-1)


def _pooled(mass: Float[Tensor, "batch head"], count: Tensor) -> Float[Tensor, " head"]:
    """The mean over every scored (prompt, query) pair: per-prompt scores weighted by their
    number of scored queries."""
    return mass.sum(0) / count.sum().clamp(min=1).to(mass.dtype)


def _where_previous(real: Mask, rank: Tensor) -> Where:
    return _pairs(real) & (rank[:, None, :] == rank[:, :, None] - 1)


def _where_bos(real: Mask, rank: Tensor) -> Where:
    return _pairs(real) & (rank[:, None, :] == 0)


def _where_duplicate(real: Mask, tokens: Tensor) -> Where:
    same = tokens[:, :, None] == tokens[:, None, :]
    return _pairs(real) & same & ~torch.eye(real.shape[1], dtype=torch.bool, device=real.device)


def _where_induction(real: Mask, tokens: Tensor) -> Where:
    """Key ``k`` follows an earlier copy of the query's token: the real token before ``k``
    (padding skipped) equals ``tokens[q]``."""
    n = real.shape[1]
    idx = torch.arange(n, device=real.device).expand_as(real)
    last_real = torch.where(real, idx, torch.full_like(idx, -1)).cummax(1).values
    before = torch.cat([last_real.new_full((real.shape[0], 1), -1), last_real[:, :-1]], 1)
    prev_token = tokens.gather(1, before.clamp(min=0))  # token of the real position before k
    copy = (prev_token[:, None, :] == tokens[:, :, None]) & (before >= 0)[:, None, :]
    return _pairs(real) & copy


def previous_token_score(
    pattern: Pattern, attention_mask: Mask | None = None
) -> Float[Tensor, " head"]:
    """Mass on the previous (real) token, averaged over the real queries that have one.

    >>> previous_token_score(cache["blocks.0.attn.hook_pattern"], cache.attention_mask)
    """
    real, rank = _real(pattern, attention_mask)
    return _pooled(*_mass(pattern, _where_previous(real, rank)))


def bos_score(pattern: Pattern, attention_mask: Mask | None = None) -> Float[Tensor, " head"]:
    """Mass on each prompt's first real token (position 0 unpadded, where BOS goes),
    averaged over the real queries; padding is never counted as BOS.

    >>> bos_score(cache["blocks.0.attn.hook_pattern"], cache.attention_mask)
    """
    real, rank = _real(pattern, attention_mask)
    return _pooled(*_mass(pattern, _where_bos(real, rank)))


def duplicate_token_score(
    pattern: Pattern, tokens: Int[Tensor, "batch pos"], attention_mask: Mask | None = None
) -> Float[Tensor, " head"]:
    """Mass on earlier real tokens equal to the query's, over the queries that have one
    (padding is never a duplicate, even where its id is a real token's).

    >>> duplicate_token_score(pattern, tokens, attention_mask=mask)
    """
    real, _ = _real(tokens, attention_mask)
    return _pooled(*_mass(pattern, _where_duplicate(real, tokens.to(pattern.device))))


def induction_score(
    pattern: Pattern, tokens: Int[Tensor, "batch pos"], attention_mask: Mask | None = None
) -> Float[Tensor, " head"]:
    """Mass on the tokens right after an earlier copy of the query's token, over the
    queries that have one.

    >>> induction_score(pattern, tokens, attention_mask=mask)
    """
    real, _ = _real(tokens, attention_mask)
    return _pooled(*_mass(pattern, _where_induction(real, tokens.to(pattern.device))))


@torch.no_grad()
def head_scores(
    model: Model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    attention_mask: Mask | Tensor | None = None,
    cache: ActivationCache | None = None,
    per_prompt: bool = False,
) -> dict[str, Labelled]:
    """Every detector's score for every head: ``Labelled`` with axes ``("layer", "head")``.

    ``tokens`` are token ids (with their ``attention_mask``) or strings (padded and masked
    for you). Padding is left out of every statistic: a padded batch scores exactly as its
    prompts would run alone. The batch's score pools every scored (prompt, query) pair, so
    it is the mean of the per-prompt scores weighted by each prompt's number of scored
    queries (the same as an unpadded batch). ``per_prompt=True`` gives each prompt's own
    score instead, axes ``("batch", "layer", "head")`` (0 where a prompt has no query the
    pattern is defined for). Patterns come from ``cache`` (and the mask from
    ``cache.attention_mask``) when given, else from a run here.

    >>> scores = head_scores(model, ["The cat sat. The cat", "Hello"])
    >>> scores["induction"].values.shape          # [n_layers, n_heads]
    >>> scores["previous_token"].top(3)
    """
    tokens, mask = batch = model.prepare(tokens, attention_mask)
    patterns = [act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
    if cache is None:
        _, cache = model.run_with_cache(batch, names_filter=patterns)
    elif attention_mask is None:
        mask = cache.attention_mask
    real, rank = _real(tokens, mask)
    tokens = tokens.to(real.device)
    wheres = {
        "previous_token": _where_previous(real, rank),
        "bos": _where_bos(real, rank),
        "duplicate_token": _where_duplicate(real, tokens),
        "induction": _where_induction(real, tokens),
    }
    rows: dict[str, list[Tensor]] = {name: [] for name in SCORES}
    for layer in range(model.cfg.n_layers):
        p = cache[patterns[layer]].float().to(real.device)
        for name in SCORES:
            mass, count = _mass(p, wheres[name])
            if per_prompt:
                rows[name].append(mass / count.clamp(min=1)[:, None].to(mass.dtype))
            else:
                rows[name].append(_pooled(mass, count))
    axes = ("batch", "layer", "head") if per_prompt else ("layer", "head")
    dim = 1 if per_prompt else 0
    return {
        name: Labelled(torch.stack(r, dim), axes, site=f"{name} score") for name, r in rows.items()
    }


_FROM_MODEL = object()


def repeated_tokens(
    batch: int,
    seq_len: int,
    d_vocab: int | None = None,
    bos: int | None = _FROM_MODEL,  # type: ignore[assignment]
    seed: int = 0,
    model: Model | None = None,
) -> Int[Tensor, "batch pos"]:
    """``[BOS] + r + r`` for a random sequence ``r`` of ``seq_len`` tokens: the standard
    probe for induction heads (the second copy is predictable only by copying).

    ``d_vocab`` defaults to ``model.cfg.d_vocab``; ``bos`` to the model's tokenizer's BOS
    (``bos=None``: no BOS). Without a model, pass both. ``r`` is drawn from every id below
    ``d_vocab`` except ``bos``, so position 0 is the only BOS.

    >>> repeated_tokens(4, 20, model=model)                    # GPT-2: BOS 50256
    >>> repeated_tokens(4, 20, d_vocab=128, bos=127)           # a toy vocabulary
    """
    if d_vocab is None:
        if model is None:
            raise ValueError("repeated_tokens needs d_vocab= or model=")
        d_vocab = model.cfg.d_vocab
    if bos is _FROM_MODEL:
        if model is None:
            raise ValueError(
                "repeated_tokens needs bos= (a token id, or None for no BOS) or model= "
                "(whose tokenizer's BOS is used)"
            )
        try:
            bos = model.tokenizer.bos_token_id
        except ValueError as e:  # a model with a vocabulary of its own and no tokenizer
            raise ValueError(f"{e}; or pass bos= to repeated_tokens") from None
    if d_vocab < (2 if bos is not None else 1):
        raise ValueError(f"d_vocab={d_vocab} leaves no token to repeat")
    if bos is not None and not 0 <= bos < d_vocab:
        raise ValueError(f"bos={bos} is outside the vocabulary [0, {d_vocab})")
    g = torch.Generator().manual_seed(seed)
    if bos is None:
        r = torch.randint(0, d_vocab, (batch, seq_len), generator=g)
        return torch.cat([r, r], dim=1)
    r = torch.randint(0, d_vocab - 1, (batch, seq_len), generator=g)
    r = r + (r >= bos).long()  # skip the BOS id
    return torch.cat([torch.full((batch, 1), bos), r, r], dim=1)


HEAD_PATTERNS = ("previous_token_head", "duplicate_token_head", "induction_head")
Heads = Sequence[tuple[int, int]] | Mapping[int, Sequence[int]]


@torch.no_grad()
def detect_head(
    model: Model,
    seq: Int[Tensor, "batch pos"] | str | list[str],
    detection_pattern: Literal["previous_token_head", "duplicate_token_head", "induction_head"]
    | Float[Tensor, "pos pos"]
    | Float[Tensor, "batch pos pos"],
    heads: Heads | None = None,
    cache: ActivationCache | None = None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: Literal["mul", "abs"] = "mul",
    attention_mask: Mask | Tensor | None = None,
) -> Labelled:
    """How closely each head's attention matches ``detection_pattern``, as TransformerLens'
    ``detect_head`` scores it: ``Labelled`` with axes ``("layer", "head")``.

    ``detection_pattern`` is one of ``HEAD_PATTERNS`` (built from each prompt's tokens) or a
    lower-triangular ``[pos, pos]`` tensor (or one per prompt, ``[batch, pos, pos]``) of
    the attention you expect. Per prompt, with ``p`` its pattern over its real tokens and
    ``d`` the detection pattern:

    - ``"mul"``: ``Σ p·d / Σ p``, the share of the head's attention on the marked pairs;
    - ``"abs"``: ``1 - Σ|p - d| / n`` (n real tokens), 1 for a perfect match, -1 for the
      worst (TransformerLens rounds this to 3 decimals; resid does not).

    ``exclude_bos`` leaves out the attention to each prompt's first real token (BOS),
    ``exclude_current_token`` each query's attention to itself. Several prompts (a list of
    strings, or a batch with its ``attention_mask``) score as the mean of their scores, as
    TransformerLens' list of prompts does, each over its real tokens only. Heads not in
    ``heads`` (``[(layer, head), ...]`` or ``{layer: [heads]}``) score -1.

    >>> detect_head(model, "The cat sat. The cat sat.", "induction_head").top(3)
    >>> detect_head(model, tokens, my_pattern, error_measure="abs", exclude_bos=True)
    """
    if error_measure not in ("mul", "abs"):
        raise ValueError(f"error_measure must be 'mul' or 'abs', not {error_measure!r}")
    tokens, mask = model.prepare(seq, attention_mask)
    if tokens.shape[1] < 2:
        raise ValueError("detect_head needs at least two tokens per prompt")
    patterns = [act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
    if cache is None:
        _, cache = model.run_with_cache(Inputs(tokens, mask), names_filter=patterns)
    elif attention_mask is None and not isinstance(seq, (str, list)):
        mask = cache.attention_mask
    real, rank = _real(tokens, mask)
    tokens = tokens.to(real.device)
    expected = _detection(detection_pattern, tokens, real, rank)
    if error_measure == "mul" and not bool(((expected == 0) | (expected == 1)).all()):
        warnings.warn(
            "a detection pattern with values other than 0 and 1 under error_measure='mul' "
            "weighs pairs, it does not predict amounts: use error_measure='abs' for that",
            stacklevel=2,
        )
    pairs = _pairs(real)  # real query, real key, key not after query
    keep = pairs.clone()
    if exclude_bos:
        keep &= ~(rank[:, None, :] == 0)
    if exclude_current_token:
        keep &= ~torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    chosen = _chosen_heads(heads, model.cfg.n_layers, model.cfg.n_heads)
    scores = torch.full((model.cfg.n_layers, model.cfg.n_heads), -1.0)
    for layer in sorted({layer for layer, _ in chosen}):
        p = cache[patterns[layer]].to(real.device, torch.float64)
        if error_measure == "mul":
            p = p * keep[:, None]
            per_prompt = (p * expected[:, None]).sum((-2, -1)) / p.sum((-2, -1))
        else:
            diff = (p - expected[:, None]).abs() * keep[:, None]
            per_prompt = 1 - diff.sum((-2, -1)) / real.sum(-1, keepdim=True)
        mean = per_prompt.mean(0).float().cpu()
        for h in (h for lay, h in chosen if lay == layer):
            scores[layer, h] = mean[h]
    return Labelled(scores, ("layer", "head"), site=f"detect_head ({error_measure})")


def _detection(
    pattern: str | Tensor, tokens: Tensor, real: Mask, rank: Tensor
) -> Float[Tensor, "batch pos pos"]:
    """The detection pattern per prompt, in float64, zero outside real (query, key) pairs."""
    if isinstance(pattern, str):
        builders = {
            "previous_token_head": lambda: _where_previous(real, rank),
            "duplicate_token_head": lambda: _where_duplicate(real, tokens),
            "induction_head": lambda: _where_induction(real, tokens),
        }
        if pattern not in builders:
            raise ValueError(
                f"detection_pattern {pattern!r} is not one of {HEAD_PATTERNS}; or pass a "
                "[pos, pos] tensor of the attention you expect"
            )
        return builders[pattern]().double()
    if not isinstance(pattern, Tensor):
        raise TypeError(
            f"detection_pattern is a name in {HEAD_PATTERNS} or a tensor, not {type(pattern).__name__}"
        )
    batch, n = real.shape
    d = pattern.to(real.device, torch.float64)
    if d.dim() == 2:
        d = d.expand(batch, n, n) if d.shape == (n, n) else d
    if tuple(d.shape) != (batch, n, n):
        raise ValueError(
            f"detection_pattern has shape {tuple(pattern.shape)}; the prompts need [{n}, {n}] "
            f"(or one per prompt, [{batch}, {n}, {n}]): one row per query position"
        )
    if not bool((d.triu(1) == 0).all()):
        raise ValueError(
            "detection_pattern must be lower triangular: a query cannot attend to a later key"
        )
    return d * _pairs(real)


def _chosen_heads(heads: Heads | None, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``heads`` as (layer, head) pairs, checked; every head when ``None``."""
    if heads is None:
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    if isinstance(heads, Mapping):
        pairs = [(layer, h) for layer, hs in heads.items() for h in hs]
    else:
        pairs = [tuple(p) for p in heads]
    for pair in pairs:
        if len(pair) != 2 or not (0 <= pair[0] < n_layers and 0 <= pair[1] < n_heads):
            raise ValueError(
                f"head {pair!r} is not a (layer, head) of this model "
                f"({n_layers} layers of {n_heads} heads)"
            )
    return [(int(layer), int(h)) for layer, h in pairs]
