"""The streaming maths of a harvest: per-unit statistics that merge exactly.

Per unit: the token count, mean and variance (population; Chan's merge of per-batch moments
in float64), min, max, how often it is active (``> threshold``), a histogram on bin edges
fixed before the run (so merges are exact sums), and the exact top-``k`` tokens, ties broken
by the lower global token index, each with a window of the tokens around it and the unit's
activation on each of them.

>>> s = UnitStats(n_units=3072, k=16, window=(12, 4))
>>> s.update(acts, tokens, mask, index)   # acts: [batch, pos, units]
>>> s.merge(other).summary()["max"]       # [units]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

EMPTY = torch.iinfo(torch.int64).max  # index of an unfilled top-k slot


# ---- histogram bins ------------------------------------------------------------------

# Bins by magnitude, four to an octave, from 2^-12 to 2^12, mirrored for negative values:
# |x| in [2^e (1 + j/4), 2^e (1 + (j+1)/4)), with one bin for |x| < 2^-12 (zero included)
# and one each for x <= -2^12 and x >= 2^12. A float32's bin is read off its exponent and
# top two mantissa bits, so binning is exact and cheap, and the same for every unit, run
# and rank: histograms merge by addition.
_OCTAVES = (-12, 12)
_PER_SIDE = 4 * (_OCTAVES[1] - _OCTAVES[0])  # 96 magnitude bins a side
N_BINS = 2 * _PER_SIDE + 3  # 195
_CENTER = _PER_SIDE + 1  # the bin of |x| < 2^-12
_Q_LO = (_OCTAVES[0] + 127) * 4  # exponent * 4 + top mantissa bits of 2^-12


def magnitude_edges() -> Float[Tensor, " 97"]:
    """The 97 magnitudes 2^-12 … 2^12 that bound the bins on each side of zero."""
    mags = [2.0**e * (1 + j / 4) for e in range(*_OCTAVES) for j in range(4)]
    return torch.tensor([*mags, 2.0 ** _OCTAVES[1]], dtype=torch.float64)


def default_edges() -> Float[Tensor, " 194"]:
    """The 194 boundaries of the 195 bins, negative to positive (bin ``i`` lies between
    ``edges[i - 1]`` and ``edges[i]``; a value on a boundary goes to the bin farther from 0).

    >>> default_edges()[96:98]   # tensor([-2^-12, 2^-12]): the bin around zero
    """
    mags = magnitude_edges()
    return torch.cat([-mags.flip(0), mags])


def bin_index(x: Float[Tensor, "..."]) -> Int[Tensor, "..."]:
    """Each float32 value's bin in ``0 … N_BINS - 1`` (int32)."""
    bits = (x.float() + 0.0).view(torch.int32)
    p = ((bits & 0x7FFFFFFF) >> 21).sub_(_Q_LO - 1).clamp_(0, _PER_SIDE + 1)
    return torch.where(bits < 0, _CENTER - p, _CENTER + p)


# ---- per-unit statistics ---------------------------------------------------------------


def _order_key(x: Float[Tensor, "..."]) -> Int[Tensor, "..."]:
    """An int32 that orders like the float32 it came from (``-0.0`` taken as ``0.0``)."""
    bits = (x + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _rank_merge(values: Tensor, index: Tensor, k: int) -> Tensor:
    """Positions (along the last axis) of the ``k`` best entries: highest value first, the
    lower index first among equal values."""
    by_index = index.argsort(dim=-1, stable=True)
    by_value = values.gather(-1, by_index).argsort(dim=-1, descending=True, stable=True)
    return by_index.gather(-1, by_value)[..., :k]


@dataclass
class UnitStats:
    """Streaming statistics of ``n_units`` units, exact to merge.

    >>> s = UnitStats(n_units=3072, k=16, window=(12, 4))
    >>> s.update(acts, tokens, mask, first_index)     # acts: [batch, pos, units]
    >>> s.merge(other)                                  # another rank's, or another run's
    """

    n_units: int
    k: int
    window: tuple[int, int]
    threshold: float = 0.0
    count: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.count is not None:
            return
        u, k, w = self.n_units, self.k, sum(self.window) + 1
        self.count = torch.zeros((), dtype=torch.int64)
        self.mean = torch.zeros(u, dtype=torch.float64)
        self.m2 = torch.zeros(u, dtype=torch.float64)
        self.max = torch.full((u,), -math.inf, dtype=torch.float32)
        self.min = torch.full((u,), math.inf, dtype=torch.float32)
        self.active = torch.zeros(u, dtype=torch.int64)
        self.hist = torch.zeros(u, N_BINS, dtype=torch.int64)
        self.top_values = torch.full((u, k), -math.inf, dtype=torch.float32)
        self.top_index = torch.full((u, k), EMPTY, dtype=torch.int64)
        self.top_tokens = torch.full((u, k, w), -1, dtype=torch.int64)
        self.top_acts = torch.full((u, k, w), math.nan, dtype=torch.float32)

    TENSORS = ("count", "mean", "m2", "max", "min", "active", "hist", "top_values", "top_index",
               "top_tokens", "top_acts")  # fmt: skip

    # -- one batch --

    def update(
        self,
        acts: Float[Tensor, "batch pos units"],
        tokens: Int[Tensor, "batch pos"],
        mask: Bool[Tensor, "batch pos"],
        index: Int[Tensor, "batch pos"],
    ) -> None:
        """Add a batch: ``mask`` marks the tokens that count, ``index`` their global token
        indices (increasing along each row and down the batch)."""
        acts = acts.float()
        real = acts[mask]  # [n, units]
        n = real.shape[0]
        if n == 0:
            return
        self._moments(real)
        self._top(acts, tokens, mask, index)

    def _moments(self, real: Tensor) -> None:
        """Moments, extremes, activity and histogram of ``real`` ``[n, units]`` (computed
        where ``real`` lives; only ``[units]``-sized results come back)."""
        n = real.shape[0]
        x = real.double()
        mean_b = x.mean(0)
        x -= mean_b
        m2_b = x.square_().sum(0)
        del x
        self._chan(n, mean_b.cpu(), m2_b.cpu())
        self.max = torch.maximum(self.max, real.amax(0).cpu())
        self.min = torch.minimum(self.min, real.amin(0).cpu())
        self.active += (real > self.threshold).sum(0).cpu()
        bins = bin_index(real)
        bins += torch.arange(self.n_units, device=real.device, dtype=torch.int32) * N_BINS
        counts = torch.bincount(bins.view(-1), minlength=self.n_units * N_BINS)
        self.hist += counts.view(self.n_units, N_BINS).cpu()

    def _chan(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        """Chan et al.'s pairwise merge of (count, mean, M2), in float64."""
        n_a = int(self.count)
        n = n_a + int(n_b)
        if n == 0:
            return
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = torch.tensor(n, dtype=torch.int64)

    def _candidates(self, flat: Float[Tensor, "n units"]) -> Int[Tensor, "units k"]:
        """Each unit's ``k`` best rows of ``flat`` by (value desc, row asc). ``topk`` on the
        values decides it unless the ``k``-th and ``k + 1``-th values tie where they could
        enter the running top-k; those units are decided on an exact (value, row) key."""
        n, units = flat.shape
        k = min(self.k, n)
        if n == k:
            return torch.arange(n, device=flat.device).expand(units, n)
        values, rows = flat.topk(k + 1, dim=0)  # [k + 1, units]
        cand = rows[:k].T.contiguous()
        tied = values[k - 1] == values[k]
        tied &= values[k - 1] >= self.top_values[:, -1].to(flat.device)
        if bool(tied.any()):
            which = tied.nonzero().squeeze(1)
            local = torch.arange(n, device=flat.device)
            key = (_order_key(flat[:, which]).long() << 32) + ((1 << 32) - 1 - local)[:, None]
            cand[which] = key.topk(k, dim=0).indices.T
        return cand

    def _top(self, acts: Tensor, tokens: Tensor, mask: Tensor, index: Tensor) -> None:
        """Merge this batch's best tokens into the running top-k, with their windows."""
        batch, pos, units = acts.shape
        flat = acts if bool(mask.all()) else acts.masked_fill(~mask[..., None], -math.inf)
        flat = flat.reshape(batch * pos, units)
        cand = self._candidates(flat)  # [units, k] flat positions
        cand_values = flat.gather(0, cand.T).T.cpu()
        cand_index = index.reshape(-1)[cand].cpu()
        values = torch.cat([self.top_values, cand_values], 1)
        idx = torch.cat([self.top_index, cand_index], 1)
        keep = _rank_merge(values, idx, self.k)  # [units, k] into the old k + the candidates
        fresh = keep >= self.k
        if not bool(fresh.any()):
            return  # nothing from this batch made it in
        self.top_values, self.top_index = values.gather(1, keep), idx.gather(1, keep)
        w = self.top_tokens.shape[-1]
        old = keep.clamp(max=self.k - 1)[..., None].expand(-1, -1, w)
        self.top_tokens = self.top_tokens.gather(1, old)
        self.top_acts = self.top_acts.gather(1, old)
        unit, slot = fresh.nonzero(as_tuple=True)  # only the entries new from this batch
        flat = cand.cpu()[unit, keep[unit, slot] - self.k]
        win_tokens, win_acts = self._windows(
            acts, tokens, mask, flat.to(acts.device), unit.to(acts.device)
        )
        self.top_tokens[unit, slot] = win_tokens
        self.top_acts[unit, slot] = win_acts

    def _windows(self, acts, tokens, mask, flat, unit) -> tuple[Tensor, Tensor]:
        """``[m, window]`` tokens and activations around flat positions ``flat`` of units
        ``unit`` (-1 and NaN outside the context or on padding)."""
        batch, pos, units = acts.shape
        left, right = self.window
        row, col = flat // pos, flat % pos
        p = col[:, None] + torch.arange(-left, right + 1, device=acts.device)  # [m, w]
        pc = p.clamp(0, pos - 1)
        at = row[:, None] * pos + pc  # flat token positions
        valid = (p >= 0) & (p < pos) & mask.reshape(-1)[at]
        win_acts = acts.reshape(-1).take(at * units + unit[:, None]).float()
        win_tokens = tokens.reshape(-1)[at]
        return (win_tokens.masked_fill(~valid, -1).long().cpu(),
                win_acts.masked_fill(~valid, math.nan).cpu())  # fmt: skip

    # -- merging and saving --

    def merge(self, other: UnitStats) -> UnitStats:
        """Fold ``other`` (the same units, k and window) into this one; returns self."""
        if (other.n_units, other.k, other.window) != (self.n_units, self.k, self.window):
            raise ValueError("cannot merge statistics of different units, k or windows")
        self._chan(int(other.count), other.mean, other.m2)
        self.max = torch.maximum(self.max, other.max)
        self.min = torch.minimum(self.min, other.min)
        self.active = self.active + other.active
        self.hist = self.hist + other.hist
        values = torch.cat([self.top_values, other.top_values], 1)
        idx = torch.cat([self.top_index, other.top_index], 1)
        keep = _rank_merge(values, idx, self.k)
        w = self.top_tokens.shape[-1]
        gather3 = keep[..., None].expand(-1, -1, w)
        self.top_tokens = torch.cat([self.top_tokens, other.top_tokens], 1).gather(1, gather3)
        self.top_acts = torch.cat([self.top_acts, other.top_acts], 1).gather(1, gather3)
        self.top_values, self.top_index = values.gather(1, keep), idx.gather(1, keep)
        return self

    def state(self, prefix: str = "") -> dict[str, Tensor]:
        """The running state as named tensors (``prefix + name``), for a rank's commit.

        >>> UnitStats.from_state(s.state("a/"), "a/", s.k, s.window, s.threshold)
        """
        return {prefix + name: getattr(self, name).contiguous() for name in self.TENSORS}

    @classmethod
    def from_state(
        cls, state: dict[str, Tensor], prefix: str, k: int, window, threshold
    ) -> UnitStats:
        """Statistics rebuilt from :meth:`state`'s tensors; each must have the shape the
        units, ``k`` and ``window`` give (a ``ValueError`` names the first that does not)."""
        s = cls(state[prefix + "mean"].shape[0], k, tuple(window), threshold)
        for name in cls.TENSORS:
            want = getattr(s, name)
            got = state.get(prefix + name)
            if got is None or got.shape != want.shape or got.dtype != want.dtype:
                shape = None if got is None else (tuple(got.shape), got.dtype)
                raise ValueError(
                    f"statistics tensor {prefix + name} is {shape}, not "
                    f"({tuple(want.shape)}, {want.dtype})"
                )
            setattr(s, name, got.clone())
        return s

    def summary(self) -> dict[str, Tensor]:
        """What ``stats/SITE.safetensors`` holds (see ``load_stats``)."""
        count = self.count
        filled = (self.top_index != EMPTY) & (self.top_values > -math.inf)
        return {
            "count": count.reshape(1),
            "mean": self.mean,
            "var": self.m2 / count.clamp(min=1),
            "m2": self.m2,
            "max": self.max,
            "min": self.min,
            "frac_active": self.active.double() / count.clamp(min=1),
            "active": self.active,
            "hist": self.hist,
            "edges": default_edges(),
            "top_values": self.top_values.masked_fill(~filled, math.nan),
            "top_index": self.top_index.masked_fill(~filled, -1),
            "top_tokens": self.top_tokens,
            "top_acts": self.top_acts,
        }
