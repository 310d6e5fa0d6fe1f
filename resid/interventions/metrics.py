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
from jaxtyping import Bool, Float, Int
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

    def positions(
        self,
        batch: int,
        n_pos: int,
        attention_mask: Bool[Tensor, "batch pos"] | Tensor | None = None,
    ) -> Int[Tensor, " batch"] | None:
        """The position each prompt is read at, made non-negative and checked.

        Without a mask a negative position counts from the end of the row, as in Python.
        With ``attention_mask`` (1 at real tokens) it counts from the end of each row's
        *real* tokens: ``pos=-1`` is each row's last real token, whichever side the padding
        is on. A non-negative position is a column index either way, and reading padding
        is refused.

        >>> Metric(fn, pos=-1).positions(2, 4, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
        tensor([1, 3])
        """
        if self.pos is None:
            return None
        pos = self.pos.expand(batch) if self.pos.dim() == 0 else self.pos
        if pos.shape != (batch,):
            raise ValueError(
                f"metric {self.name!r} has {pos.numel()} positions for {batch} prompts"
            )
        if attention_mask is None:
            if ((pos < -n_pos) | (pos >= n_pos)).any():
                raise IndexError(
                    f"metric {self.name!r} reads position(s) {pos.tolist()}, "
                    f"outside [-{n_pos}, {n_pos})"
                )
            return pos % n_pos
        mask = torch.as_tensor(attention_mask)
        if tuple(mask.shape) != (batch, n_pos):
            raise ValueError(
                f"metric {self.name!r}: attention_mask has shape {tuple(mask.shape)}, the "
                f"logits are [{batch}, {n_pos}, d_vocab]: give the mask of the run they came from"
            )
        mask = mask.cpu().bool()
        pos = pos.cpu()
        n_real = mask.sum(1)
        if ((pos >= n_pos) | (pos < -n_real)).any():
            raise IndexError(
                f"metric {self.name!r} reads position(s) {pos.tolist()}, outside rows of "
                f"{n_pos} positions with {n_real.tolist()} real tokens"
            )
        # the k-th real token of row b is where the running count of real tokens reaches k + 1
        rank = mask.long().cumsum(1) - 1  # rank among real tokens, at real tokens
        k = (n_real + pos).clamp(min=0)  # for negative pos: which real token
        real_index = ((rank == k[:, None]) & mask).long().argmax(1)
        out = torch.where(pos < 0, real_index, pos)
        on_padding = ~mask[torch.arange(batch), out]
        if on_padding.any():
            rows = on_padding.nonzero().flatten().tolist()
            raise IndexError(
                f"metric {self.name!r} reads padding in rows {rows} (positions "
                f"{out[on_padding].tolist()}): use a negative pos to count from each row's "
                "last real token"
            )
        return out

    def token_ids(self, batch: int) -> Int[Tensor, "batch k"] | None:
        if self.tokens is None:
            return None
        t = self.tokens
        return t.expand(batch, -1) if t.dim() == 1 else t

    def select(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        attention_mask: Bool[Tensor, "batch pos"] | Tensor | None = None,
    ) -> Tensor:
        """The logits ``fn`` reads, taken from full logits (at each row's real positions
        under ``attention_mask``; see ``positions``)."""
        batch, n_pos, _ = logits.shape
        pos = self.positions(batch, n_pos, attention_mask)
        if pos is not None:
            logits = logits[torch.arange(batch), pos.to(logits.device)]
        tokens = self.token_ids(batch)
        if tokens is None:
            return logits
        tokens = tokens.to(logits.device)
        if logits.dim() == 3:
            tokens = tokens[:, None].expand(-1, logits.shape[1], -1)
        return logits.gather(-1, tokens)

    def __call__(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        attention_mask: Bool[Tensor, "batch pos"] | Tensor | None = None,
    ) -> Tensor:
        """The metric of full logits; with ``attention_mask`` (the run's, 1 at real tokens)
        ``pos=-1`` reads each row's last real token.

        >>> metric(model(tokens, attention_mask=mask), attention_mask=mask)
        """
        return torch.as_tensor(self.fn(self.select(logits, attention_mask)))

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


def _of_token(token: int | Tensor, pos: int | Tensor, normalise, name: str) -> Metric:
    """The mean over prompts of ``normalise`` (``torch.softmax``, ``torch.log_softmax``) of
    the logits, at ``token`` (one id, or one per prompt) at ``pos``."""
    tok = _per_prompt(token, "token")

    def fn(sel: Float[Tensor, "batch d_vocab"]) -> Tensor:
        t = tok.to(sel.device).expand(sel.shape[0])
        return normalise(sel.float(), -1).gather(-1, t[:, None]).mean()

    return Metric(fn, pos, None, name)


def log_prob(token: int | Tensor, pos: int | Tensor = -1) -> Metric:
    """Mean log-probability of ``token`` (one id, or one per prompt) at ``pos``.

    >>> m = log_prob(token=1234)
    """
    return _of_token(token, pos, torch.log_softmax, "log_prob")


def prob(token: int | Tensor, pos: int | Tensor = -1) -> Metric:
    """Mean probability of ``token`` at ``pos``.

    >>> m = prob(token=1234)
    """
    return _of_token(token, pos, torch.softmax, "prob")


def kl_to_clean(
    clean_logits: Float[Tensor, "batch pos d_vocab"],
    pos: int | Tensor | None = -1,
    attention_mask: Bool[Tensor, "batch pos"] | Tensor | None = None,
) -> Metric:
    """Mean KL(clean ‖ patched) of the next-token distributions at ``pos`` (all positions if
    ``None``): 0 when the patch restores the clean run.

    ``attention_mask`` is the clean run's (1 at real tokens): ``pos=-1`` then reads each
    row's last real token, and with ``pos=None`` the mean is over real positions only (the
    patched run must have the same padding).

    >>> m = kl_to_clean(model(clean_tokens, attention_mask=mask), attention_mask=mask)
    """
    ref = Metric(lambda sel: sel, pos, None, "kl_to_clean").select(clean_logits, attention_mask)
    ref = ref.float().log_softmax(-1)
    weight = None
    if pos is None and attention_mask is not None:
        weight = torch.as_tensor(attention_mask).bool().float()  # [batch, pos]

    def fn(sel: Tensor) -> Tensor:
        lp = sel.float().log_softmax(-1)
        r = ref.to(sel.device)
        kl = (r.exp() * (r - lp)).sum(-1)
        if weight is None:
            return kl.mean()
        if kl.shape != weight.shape:
            raise ValueError(
                f"kl_to_clean: the patched logits cover {tuple(kl.shape)} positions, the "
                f"clean run's mask {tuple(weight.shape)}: patch prompts padded like the clean ones"
            )
        w = weight.to(kl.device)
        return (kl * w).sum() / w.sum()

    return Metric(fn, pos, None, "kl_to_clean")


def normalized(
    metric: Metric,
    clean: float | Tensor,
    corrupted: float | Tensor,
    attention_mask: Bool[Tensor, "batch pos"] | Tensor | None = None,
) -> Metric:
    """``(metric - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = clean restored.

    ``clean`` and ``corrupted`` are the metric's values, or logits to evaluate it on (read
    under ``attention_mask``, the runs' mask, when they are padded).

    >>> m = normalized(logit_diff(a, w), clean=model(clean_tokens), corrupted=model(corr_tokens))
    """

    def value(x: float | Tensor) -> float:
        if isinstance(x, Tensor) and x.dim() == 3:
            return float(metric(x, attention_mask=attention_mask))
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


def as_metric(metric: Metric | MetricFn) -> Metric:
    """``metric`` as a ``Metric``: a plain function of logits declares nothing (it gets all
    the logits)."""
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise TypeError(f"metric must be a function of logits or a Metric, not {metric!r}")
    return Metric(metric, pos=None, tokens=None, name=getattr(metric, "__name__", "metric"))
