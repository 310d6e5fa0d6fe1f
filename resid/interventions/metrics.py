"""Patching metrics: functions of logits that may say which logits they read.

Any function ``logits [batch, pos, d_vocab] -> scalar`` is a metric. A ``Metric`` also
*declares* the one position per prompt (``pos``) and, optionally, the vocabulary columns
(``tokens``) it reads, so a sweep can compute just those logits, ``ln_final(resid[pos]) @
W_U[:, tokens]``, instead of 50,257 per position:

>>> metric = logit_diff(answer=model.to_single_token(" Mary"), wrong=model.to_single_token(" John"))
>>> metric(model(tokens))            # works on full logits like any function
>>> metric.fn(selected)              # what sweeps call: selected logits [batch, 2]

``fn`` gets the selected logits: ``[batch, k]`` (``[batch, d_vocab]`` without ``tokens``)
when ``pos`` is given, ``[batch, pos, k]`` when it is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float]


def _per_prompt(x: int | Tensor | list[int], name: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() > 1:
        raise ValueError(
            f"{name} must be one id per prompt ([batch]) or one for all, got {tuple(t.shape)}"
        )
    return t


class Metric:
    """A metric that declares what it reads: ``pos`` (int, ``[batch]`` or ``None`` for all
    positions) and ``tokens`` (``[k]``, ``[batch, k]`` or ``None`` for the whole vocabulary).

    >>> m = Metric(lambda sel: sel[:, 0].mean(), pos=-1, tokens=[1234])  # logit of token 1234
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor | float],
        pos: int | Tensor | list[int] | None = -1,
        tokens: Tensor | list[int] | None = None,
        name: str = "metric",
    ):
        self.fn = fn
        self.pos = None if pos is None else _per_prompt(pos, "pos")
        self.tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.long)
        self.name = name

    def positions(self, batch: int, n_pos: int) -> Int[Tensor, " batch"] | None:
        """The position each prompt is read at, made non-negative and checked."""
        if self.pos is None:
            return None
        pos = self.pos.expand(batch) if self.pos.dim() == 0 else self.pos
        if pos.shape != (batch,):
            raise ValueError(
                f"metric {self.name!r} has {pos.numel()} positions for {batch} prompts"
            )
        if ((pos < -n_pos) | (pos >= n_pos)).any():
            raise IndexError(
                f"metric {self.name!r} reads position(s) {pos.tolist()}, outside [-{n_pos}, {n_pos})"
            )
        return pos % n_pos

    def token_ids(self, batch: int) -> Int[Tensor, "batch k"] | None:
        if self.tokens is None:
            return None
        t = self.tokens
        return t.expand(batch, -1) if t.dim() == 1 else t

    def select(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        """The logits ``fn`` reads, taken from full logits."""
        batch, n_pos, _ = logits.shape
        pos = self.positions(batch, n_pos)
        if pos is not None:
            logits = logits[torch.arange(batch), pos.to(logits.device)]
        tokens = self.token_ids(batch)
        if tokens is None:
            return logits
        tokens = tokens.to(logits.device)
        if logits.dim() == 3:
            tokens = tokens[:, None].expand(-1, logits.shape[1], -1)
        return logits.gather(-1, tokens)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        return torch.as_tensor(self.fn(self.select(logits)))

    def __repr__(self) -> str:
        return f"Metric({self.name!r}, pos={self.pos}, tokens={self.tokens})"


def logit_diff(answer: int | Tensor, wrong: int | Tensor, pos: int | Tensor | None = -1) -> Metric:
    """Mean over prompts of ``logit[answer] - logit[wrong]`` at ``pos`` (ids per prompt or shared).

    >>> m = logit_diff(answer=torch.tensor([5, 9]), wrong=torch.tensor([9, 5]))
    """
    a, w = _per_prompt(answer, "answer"), _per_prompt(wrong, "wrong")
    a, w = torch.broadcast_tensors(a, w)
    tokens = torch.stack([a, w], -1)
    return Metric(lambda sel: (sel[..., 0] - sel[..., 1]).float().mean(), pos, tokens, "logit_diff")


def log_prob(token: int | Tensor, pos: int | Tensor = -1) -> Metric:
    """Mean log-probability of ``token`` (one id, or one per prompt) at ``pos``.

    >>> m = log_prob(token=1234)
    """
    tok = _per_prompt(token, "token")

    def fn(sel: Float[Tensor, "batch d_vocab"]) -> Tensor:
        t = tok.to(sel.device).expand(sel.shape[0])
        return sel.float().log_softmax(-1).gather(-1, t[:, None]).mean()

    return Metric(fn, pos, None, "log_prob")


def prob(token: int | Tensor, pos: int | Tensor = -1) -> Metric:
    """Mean probability of ``token`` at ``pos``.

    >>> m = prob(token=1234)
    """
    tok = _per_prompt(token, "token")

    def fn(sel: Float[Tensor, "batch d_vocab"]) -> Tensor:
        t = tok.to(sel.device).expand(sel.shape[0])
        return sel.float().softmax(-1).gather(-1, t[:, None]).mean()

    return Metric(fn, pos, None, "prob")


def kl_to_clean(
    clean_logits: Float[Tensor, "batch pos d_vocab"], pos: int | Tensor | None = -1
) -> Metric:
    """Mean KL(clean ‖ patched) of the next-token distributions at ``pos`` (all positions if
    ``None``): 0 when the patch restores the clean run.

    >>> m = kl_to_clean(model(clean_tokens))
    """
    ref = Metric(lambda sel: sel, pos, None).select(clean_logits).float().log_softmax(-1)

    def fn(sel: Tensor) -> Tensor:
        lp = sel.float().log_softmax(-1)
        r = ref.to(sel.device)
        return (r.exp() * (r - lp)).sum(-1).mean()

    return Metric(fn, pos, None, "kl_to_clean")


def normalized(metric: Metric, clean: float | Tensor, corrupted: float | Tensor) -> Metric:
    """``(metric - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = clean restored.

    ``clean`` and ``corrupted`` are the metric's values, or logits to evaluate it on.

    >>> m = normalized(logit_diff(a, w), clean=model(clean_tokens), corrupted=model(corr_tokens))
    """

    def value(x: float | Tensor) -> float:
        if isinstance(x, Tensor) and x.dim() == 3:
            return float(metric(x))
        return float(x)

    c, k = value(clean), value(corrupted)
    if c == k:
        raise ValueError(f"clean and corrupted {metric.name} are both {c}: nothing to normalise by")
    return Metric(
        lambda sel: (torch.as_tensor(metric.fn(sel)) - k) / (c - k),
        metric.pos,
        metric.tokens,
        f"normalized {metric.name}",
    )
