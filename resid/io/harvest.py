"""Corpus-scale harvesting: activations and per-unit statistics over a text corpus, on one
process or many (``torchrun``), killable and resumable.

>>> harvest(model, "corpus.txt", "harvest", sites=["blocks.5.mlp.hook_post"])
>>> stats = load_stats("harvest", "blocks.5.mlp.hook_post")
>>> stats["max"].shape, stats["top_values"].shape   # [d_mlp], [d_mlp, k]

What it computes, per site (any name in ``model.hook_dict`` whose activation is
``[batch, pos, ...]``, the trailing axes flattened into units; spliced SAE sites
included):

- with ``stats``: per unit the token count, mean, variance (population; Chan's merge of
  per-batch moments in float64), min, max, fraction active (``> active_threshold``), a
  histogram on bin edges fixed before the run (so merges are exact sums), and the exact
  top-``k`` activating tokens, ties broken by the lower global token index, each with a
  window of the tokens around it and the unit's activation on each of them;
- with ``activations``: every real token's activation, in ``store_dtype``, written as
  sharded safetensors (``shards/NNNNNN.safetensors``: one tensor per site
  ``[rows, units]``, plus ``tokens`` and ``index``, the global token index
  ``context * context_length + position``).

Padding never reaches a statistic or a shard. The corpus is cut into contexts
(``resid.io.corpus``), contexts into batches of ``batch_size``, and batches into chunks of
``shard_batches`` batches. Chunk ``c`` is processed by rank ``c % world_size``, always as
the same batches, so every shard is bit-identical whatever the number of processes, and the
statistics differ only by float64 rounding in the order of the merges. Each finished chunk
commits its shard and then the rank's running statistics (``ranks/R.safetensors``), so a run
killed at any moment resumes (``resume=True``) from its last committed chunk and ends
identical to an uninterrupted run.

Every file is written to a temporary sibling and renamed. The folder's
``resid-manifest.json`` (``resid.core.files``) lists every output file with its SHA-256;
resid refuses a folder holding anything it cannot prove it wrote, and never deletes a
finished harvest.

Across processes (``torchrun --nproc-per-node N -m resid harvest ...``, or several
machines through torchrun's rendezvous), the ranks share the output folder (a filesystem
every rank sees, checked at the start), and the statistics are merged exactly with
``torch.distributed`` (gloo on CPU, NCCL on GPUs); rank 0 writes the merged statistics and
the manifest.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from resid.core import files
from resid.io.corpus import Corpus, Mode, contexts, open_corpus

if TYPE_CHECKING:
    from resid.core.model import Model

WRITER = "resid harvest"
VERSION = 1
EMPTY = torch.iinfo(torch.int64).max  # index of an unfilled top-k slot
_SHARD = re.compile(r"shards/\d{6}\.safetensors")
_RANK = re.compile(r"ranks/\d+\.safetensors")
_STATS = re.compile(r"stats/[^/]+\.safetensors")


class HarvestError(ValueError):
    """A harvest that cannot start or resume; the message names the problem and the fix."""


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
        return {prefix + name: getattr(self, name).contiguous() for name in self.TENSORS}

    @classmethod
    def from_state(
        cls, state: dict[str, Tensor], prefix: str, k: int, window, threshold
    ) -> UnitStats:
        s = cls(state[prefix + "mean"].shape[0], k, tuple(window), threshold)
        for name in cls.TENSORS:
            setattr(s, name, state[prefix + name].clone())
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


# ---- sites --------------------------------------------------------------------------------


def check_sites(model: Model, sites: Sequence[str]) -> list[str]:
    """The site names, checked against ``model.hook_dict`` now (SAE sites spliced in by an
    enclosing ``with model.saes(...)`` count)."""
    if isinstance(sites, str):
        sites = [s for s in sites.split(",") if s.strip()]
    sites = [s.strip() for s in sites]
    if not sites:
        raise HarvestError("give at least one site, e.g. blocks.5.mlp.hook_post")
    if len(set(sites)) != len(sites):
        raise HarvestError(f"a site is listed twice: {sites}")
    for s in sites:
        if s not in model.hook_dict:
            close = difflib.get_close_matches(s, model.hook_names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HarvestError(
                f"no hook site {s!r} in this model{hint} (resid info MODEL lists them)"
            )
        if s.endswith(("hook_pattern", "hook_attn_scores")):
            raise HarvestError(
                f"{s} is [batch, head, query, key], not one vector per token: harvest a per-token "
                "site (e.g. blocks.L.attn.hook_z or blocks.L.hook_attn_out)"
            )
    return sites


def _stop_layer(model: Model, sites: list[str]) -> int | None:
    """The layer after which nothing the sites need is computed (None: run everything)."""
    last = -1
    for s in sites:
        m = re.match(r"blocks\.(\d+)\.", s)
        if m is None:
            if s.startswith(("hook_embed", "hook_pos_embed")):
                continue
            return None
        last = max(last, int(m.group(1)))
    return last + 1


# ---- the run's identity and the folder -----------------------------------------------------


def model_fingerprint(model: Model) -> str:
    """SHA-256 over every parameter's name, shape, dtype and a strided sample of its values."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> str:
    """safetensors to ``path`` via ``path.partial``; returns its SHA-256."""
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    digest = files.sha256(tmp)
    os.replace(tmp, path)
    return digest


def _safetensors_meta(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def _read_manifest(out: Path) -> dict | None:
    manifest = files.read_manifest(out)
    if (
        manifest is None
        or manifest.get("writer") != WRITER
        or not isinstance(manifest.get("harvest"), dict)
    ):
        return None
    return manifest


def foreign_files(out: Path) -> list[str]:
    """Files in a harvest folder that resid cannot prove this harvest wrote: not listed with
    their hash in the manifest or a rank's committed state, and not a shard or temporary
    file tagged with this run's id."""
    if not out.exists():
        return []
    entries = [p for p in out.rglob("*")]
    if not entries:
        return []
    manifest = _read_manifest(out)
    if manifest is None:
        return [p.relative_to(out).as_posix() for p in entries if not p.is_dir()] or [
            "(subfolders)"
        ]
    run = manifest["harvest"].get("run_id")
    proven = dict(manifest["files"])
    for p in (out / "ranks").glob("*.safetensors") if (out / "ranks").is_dir() else []:
        meta = _safetensors_meta(p)
        if meta and meta.get("run_id") == run and meta.get("writer") == WRITER:
            proven[p.relative_to(out).as_posix()] = None
            proven.update(json.loads(meta.get("files", "{}")))
    foreign = []
    for p in entries:
        rel = p.relative_to(out).as_posix()
        if p.is_dir() and not p.is_symlink():
            if rel not in ("shards", "ranks", "stats"):
                foreign.append(rel + "/")
            continue
        if rel == files.MANIFEST:
            continue
        name = rel[: -len(".partial")] if rel.endswith(".partial") else rel
        pattern_ok = bool(_SHARD.fullmatch(name) or _RANK.fullmatch(name) or _STATS.fullmatch(name))
        if p.is_symlink() or not p.is_file():
            foreign.append(rel)
        elif rel in proven and proven[rel] is not None:
            if files.sha256(p) != proven[rel]:
                foreign.append(f"{rel} (changed since resid wrote it)")
        elif rel in proven:
            continue
        elif (
            pattern_ok
            and not rel.endswith(".partial")
            and (_safetensors_meta(p) or {}).get("run_id") == run
        ):
            continue  # committed by its rank but the rank's state not yet: redone on resume
        elif rel.endswith(".partial") and pattern_ok:
            continue  # a temporary sibling: overwritten on resume
        else:
            foreign.append(rel)
    return foreign


# ---- distributed ----------------------------------------------------------------------------


def init_distributed(
    device: str | None = None, timeout_s: float = 600.0
) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``,
    …), with gloo on CPU and NCCL on CUDA, and a timeout on the rendezvous and every
    collective. Returns ``(rank, world_size, device)``; without torchrun, ``(0, 1, device)``.

    >>> rank, world, device = init_distributed("cuda")   # cuda:LOCAL_RANK under torchrun
    """
    want = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        if not dist.is_available():
            raise HarvestError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        backend = "nccl" if want.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # rendezvous failures come in many types
            raise HarvestError(
                f"could not join the process group ({backend}, {timeout_s:.0f} s timeout): {e}. "
                "Check MASTER_ADDR/MASTER_PORT (or --rdzv-endpoint) and that every node runs torchrun"
            ) from e
        rank = dist.get_rank()
    else:
        return 0, 1, want
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(want)
    return rank, world, want


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, rank: int, world: int) -> list | None:
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ---- the run ----------------------------------------------------------------------------


@dataclass
class _Batch:
    tokens: Tensor  # [batch, pos]
    mask: Tensor  # [batch, pos]
    index: Tensor  # [batch, pos] global token index


def _chunks(
    corpus: Corpus, model: Model, cfg: dict
) -> Iterator[tuple[int, list[list[int]], float]]:
    """``(chunk number, its contexts, fraction read)``, the last chunk possibly short; stops
    at ``max_tokens`` real tokens (counted over whole contexts, the same on every rank)."""
    size = cfg["batch_size"] * cfg["shard_batches"]
    chunk: list[list[int]] = []
    number, seen, fraction = 0, 0, 0.0
    limit = cfg["max_tokens"]
    for ids, fraction in contexts(corpus, model.tokenizer, cfg["context_length"], cfg["mode"]):
        chunk.append(ids)
        seen += len(ids)
        if len(chunk) == size:
            yield number, chunk, fraction
            number, chunk = number + 1, []
        if limit is not None and seen >= limit:
            break
    if chunk:
        yield number, chunk, fraction


def _batches(chunk: list[list[int]], number: int, cfg: dict, pad: int) -> Iterator[_Batch]:
    size, length = cfg["batch_size"], cfg["context_length"]
    first = number * cfg["batch_size"] * cfg["shard_batches"]
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
        yield _Batch(tokens, mask, index)


def _run_config(model, corpus, sites, label, **kw) -> dict:
    return {
        "version": VERSION,
        "model": label,
        "model_fingerprint": model_fingerprint(model),
        "model_config": model.cfg.to_dict(),
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "corpus": str(corpus.path),
        "corpus_kind": corpus.kind,
        "corpus_fingerprint": corpus.fingerprint(),
        "text_field": corpus.text_field,
        "split": corpus.split,
        "sites": sites,
        "histogram": "signed, 4 bins an octave, 2^-12 to 2^12",
        **kw,
    }


_CHANGE_OK = {
    "run_id",
    "status",
    "world_size",
    "model",
    "corpus",
}  # paths may be spelled differently


def _check_resume(manifest: dict, cfg: dict, world: int) -> None:
    old = manifest["harvest"]
    if old.get("world_size") != world:
        raise HarvestError(
            f"this harvest was started with {old.get('world_size')} process(es) and is being resumed "
            f"with {world}: each rank resumes its own slice, so resume with "
            f"--nproc-per-node/--nnodes giving {old.get('world_size')} processes"
        )
    diffs = [k for k in cfg if k not in _CHANGE_OK and old.get(k) != cfg[k]]
    if diffs:
        shown = "; ".join(f"{k}: was {old.get(k)!r}, now {cfg[k]!r}" for k in diffs[:4])
        raise HarvestError(
            f"--resume with different settings ({', '.join(diffs)}{': ' + shown if shown else ''}): "
            "resume with the original command, or harvest to a new folder"
        )


def _decide(out: Path, cfg: dict, world: int, resume: bool) -> dict:
    """Rank 0's verdict on the output folder: {"action": "fresh"|"resume"|"done"} or
    {"error": message}."""
    try:
        if out.exists() and not out.is_dir():
            return {"error": f"{out} exists and is not a folder: choose another --out"}
        empty = not out.exists() or not any(out.iterdir())
        if empty:
            if resume:
                return {
                    "error": f"nothing to resume: {out} holds no harvest (run without --resume)"
                }
            return {"action": "fresh"}
        manifest = _read_manifest(out)
        foreign = foreign_files(out)
        if manifest is None or foreign:
            what = files._describe(foreign) if foreign else "no resid harvest manifest"
            return {"error": (f"{out} holds files that resid harvest did not write ({what}): "
                              "resid never replaces them; choose another --out")}  # fmt: skip
        status = manifest["harvest"].get("status")
        if not resume:
            if status == "complete":
                return {"error": f"{out} holds a finished harvest; resid never deletes one: "
                                 "choose another --out, or delete it yourself"}  # fmt: skip
            return {"error": f"{out} holds an interrupted harvest: pass --resume to finish it "
                             "(with the same settings and number of processes), or choose another --out"}  # fmt: skip
        _check_resume(manifest, cfg, world)
        return {
            "action": "done" if status == "complete" else "resume",
            "run_id": manifest["harvest"]["run_id"],
        }
    except HarvestError as e:
        return {"error": str(e)}


def _write_manifest(out: Path, harvest_info: dict, listed: dict[str, str]) -> None:
    body = {"writer": WRITER, "files": dict(sorted(listed.items())), "harvest": harvest_info}
    _atomic_write_bytes(out / files.MANIFEST, (json.dumps(body, indent=1) + "\n").encode())


def harvest(
    model: Model,
    corpus: str | Path | Corpus,
    out: str | Path,
    sites: Sequence[str] | str,
    *,
    stats: bool = True,
    activations: bool = False,
    context_length: int | None = None,
    mode: Mode = "concat",
    batch_size: int = 8,
    shard_batches: int = 16,
    max_tokens: int | None = None,
    store_dtype: torch.dtype | None = None,
    k: int = 16,
    window: tuple[int, int] = (12, 4),
    active_threshold: float = 0.0,
    exclude_bos: bool = False,
    text_field: str = "text",
    split: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: bool = False,
    label: str | None = None,
) -> Path:
    """Run ``model`` over ``corpus`` and write what the sites did to the folder ``out``.

    ``sites``: hook names (a list, or a comma-separated string). ``stats``: per-unit
    statistics to ``out/stats/SITE.safetensors``; ``activations``: every real token's
    activations to ``out/shards/`` in ``store_dtype`` (default: the model's). Contexts of
    ``context_length`` tokens (default 128, or ``n_ctx`` if shorter; ``mode`` "concat" or "rows", see ``resid.io.corpus``), in
    batches of ``batch_size``; ``shard_batches`` batches make a chunk, the unit of work
    split across ranks and of resumption. ``max_tokens`` stops after the context that
    reaches it.
    ``exclude_bos`` leaves ``<|endoftext|>`` tokens out of statistics and shards.

    Under ``torchrun`` (or any initialised process group) each rank runs its chunks and
    rank 0 merges; call it on every rank. Hooks attached around the call apply.

    >>> harvest(model, "wiki.txt", "h", ["blocks.5.mlp.hook_post"], max_tokens=1_000_000)
    >>> harvest(model, "wiki.txt", "h", ["blocks.5.mlp.hook_post"], resume=True)  # after a kill
    """
    rank, world = _world()
    sites = check_sites(model, sites)
    if not (stats or activations):
        raise HarvestError("nothing to harvest: ask for statistics, activations or both")
    for name, value, lo in (("batch_size", batch_size, 1), ("shard_batches", shard_batches, 1),
                            ("k", k, 1)):  # fmt: skip
        if not isinstance(value, int) or value < lo:
            raise HarvestError(f"{name} must be an int >= {lo}, not {value!r}")
    context_length = min(128, model.cfg.n_ctx) if context_length is None else context_length
    if not isinstance(context_length, int) or not 2 <= context_length <= model.cfg.n_ctx:
        raise HarvestError(
            f"context_length must be in [2, {model.cfg.n_ctx}], not {context_length!r}"
        )
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise HarvestError(f"max_tokens must be a positive int, not {max_tokens!r}")
    if len(window) != 2 or min(window) < 0:
        raise HarvestError(f"window is (tokens before, tokens after), both >= 0, not {window!r}")
    store_dtype = store_dtype or model.dtype
    if not store_dtype.is_floating_point:
        raise HarvestError(f"store_dtype must be a float dtype, not {store_dtype}")
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus, text_field, split)
    out = files.target(out)
    cfg = _run_config(
        model, corpus, sites, label or str(getattr(model, "name_or_path", "model")),
        stats=stats, activations=activations, context_length=context_length, mode=mode,
        batch_size=batch_size, shard_batches=shard_batches, max_tokens=max_tokens,
        store_dtype=str(store_dtype).removeprefix("torch."), k=k, window=list(window),
        active_threshold=active_threshold, exclude_bos=exclude_bos,
    )  # fmt: skip

    # the corpus must give at least one context before anything is written
    first = next(contexts(corpus, model.tokenizer, context_length, mode), None)
    if first is None:
        raise HarvestError(
            f"the corpus {corpus.path} gives no context: it is empty, or shorter than one "
            f"context of {context_length} tokens (use a shorter --context-length or --mode rows)"
        )

    verdict = _broadcast(_decide(out, cfg, world, resume) if rank == 0 else None, rank, world)
    if "error" in verdict:
        raise HarvestError(verdict["error"])
    if verdict["action"] == "fresh":
        run_id = uuid.uuid4().hex
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _write_manifest(
                out, {**cfg, "run_id": run_id, "world_size": world, "status": "running"}, {}
            )
        run_id = _broadcast(run_id, rank, world)
    else:
        run_id = verdict["run_id"]
    _barrier(world)
    manifest = _read_manifest(out)
    if manifest is None or manifest["harvest"].get("run_id") != run_id:
        raise HarvestError(
            f"rank {rank} cannot see {out / files.MANIFEST} that rank 0 wrote: every rank must "
            "write to a folder on a filesystem they all share"
        )
    if verdict["action"] == "done":
        if rank == 0:
            _cleanup_ranks(out, run_id)
            print(f"resid harvest: {out} is already complete", file=sys.stderr)
        _barrier(world)
        return out
    for sub in ("ranks", "shards", "stats"):
        (out / sub).mkdir(exist_ok=True)

    runner = _Runner(
        model, corpus, out, cfg, sites, run_id, rank, world, progress, log, store_dtype
    )
    runner.run()
    return out


def _cleanup_ranks(out: Path, run_id: str) -> None:
    """Remove the ranks' working state once the manifest is final (only files whose
    content proves them this run's)."""
    folder = out / "ranks"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        meta = _safetensors_meta(p) if p.suffix == ".safetensors" else None
        if meta and meta.get("run_id") == run_id and meta.get("writer") == WRITER:
            p.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass


class _Runner:
    def __init__(
        self, model, corpus, out, cfg, sites, run_id, rank, world, progress, log, store_dtype
    ):
        self.model, self.corpus, self.out, self.cfg, self.sites = model, corpus, out, cfg, sites
        self.run_id, self.rank, self.world, self.log = run_id, rank, world, log
        self.store_dtype = store_dtype
        self.progress = progress and rank == 0
        self.state_path = out / "ranks" / f"{rank}.safetensors"
        self.done: list[int] = []
        self.shards: dict[str, dict] = {}  # rel path -> {"chunk", "rows", "sha256"}
        self.tokens = 0  # real tokens this rank harvested
        self.stats: dict[str, UnitStats] = {}
        self.bos = model.tokenizer.bos_token_id
        self.stop = _stop_layer(model, sites)

    # -- committed state per rank --

    def _load(self) -> None:
        if not self.state_path.exists():
            return
        meta = _safetensors_meta(self.state_path)
        if not meta or meta.get("run_id") != self.run_id:
            raise HarvestError(f"{self.state_path} is not this harvest's rank {self.rank} state")
        listed = json.loads(meta["files"])
        for rel, digest in listed.items():
            path = self.out / rel
            if not path.is_file() or files.sha256(path) != digest:
                raise HarvestError(
                    f"{path} is missing or changed since this harvest wrote it: the run cannot "
                    "resume exactly; harvest to a new folder"
                )
        self.done = json.loads(meta["done"])
        self.shards = json.loads(meta["shards"])
        self.tokens = int(meta["tokens"])
        if self.cfg["stats"]:
            state = load_file(str(self.state_path))
            for s in self.sites:
                self.stats[s] = UnitStats.from_state(state, f"{s}/", self.cfg["k"], self.cfg["window"],
                                                     self.cfg["active_threshold"])  # fmt: skip

    def _commit(self) -> None:
        tensors = {}
        if self.cfg["stats"]:
            for s, st in self.stats.items():
                tensors.update(st.state(f"{s}/"))
        if not tensors:
            tensors = {"none": torch.zeros(0)}
        listed = {rel: info["sha256"] for rel, info in self.shards.items()}
        meta = {"writer": WRITER, "run_id": self.run_id, "rank": str(self.rank),
                "done": json.dumps(self.done), "shards": json.dumps(self.shards),
                "files": json.dumps(listed), "tokens": str(self.tokens)}  # fmt: skip
        _atomic_save(tensors, self.state_path, meta)

    # -- work --

    def _forward(self, batch: _Batch) -> dict[str, Tensor]:
        got: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> None:
            got[hook.name] = act

        device = self.model.device
        mask = batch.mask.to(device)
        kwargs = {"attention_mask": mask if not bool(mask.all()) else None}
        with torch.no_grad(), self.model.hooks([(s, grab) for s in self.sites]):
            if self.stop is not None:
                self.model(batch.tokens.to(device), stop_at_layer=self.stop, **kwargs)
            else:
                self.model(batch.tokens.to(device), return_type=None, **kwargs)
        missing = [s for s in self.sites if s not in got]
        if missing:
            raise HarvestError(f"the sites {missing} did not run in the forward pass")
        b, p = batch.tokens.shape
        out = {}
        for s in self.sites:
            act = got[s]
            if act.dim() < 2 or tuple(act.shape[:2]) != (b, p):
                raise HarvestError(
                    f"{s} gave shape {tuple(act.shape)}, not [batch, pos, ...]: not a per-token site"
                )
            out[s] = act.reshape(b, p, -1)
        return out

    def _chunk(self, number: int, chunk: list[list[int]]) -> int:
        rows_tokens, rows_index, rows_acts = [], [], {s: [] for s in self.sites}
        n_real = 0
        for batch in _batches(chunk, number, self.cfg, self.model.tokenizer.pad_token_id):
            acts = self._forward(batch)
            mask = batch.mask
            if self.cfg["exclude_bos"]:
                mask = mask & (batch.tokens != self.bos)
            n_real += int(mask.sum())
            dev_mask = mask.to(self.model.device)
            for s, a in acts.items():
                if self.cfg["stats"]:
                    if s not in self.stats:
                        self.stats[s] = UnitStats(a.shape[-1], self.cfg["k"], tuple(self.cfg["window"]),
                                                  self.cfg["active_threshold"])  # fmt: skip
                    self.stats[s].update(
                        a, batch.tokens.to(a.device), dev_mask, batch.index.to(a.device)
                    )
                if self.cfg["activations"]:
                    rows_acts[s].append(a[dev_mask].to("cpu", self.store_dtype))
            if self.cfg["activations"]:
                rows_tokens.append(batch.tokens[mask].to(torch.int32))
                rows_index.append(batch.index[mask])
        if self.cfg["activations"]:
            rel = f"shards/{number:06d}.safetensors"
            tensors = {s: torch.cat(v) for s, v in rows_acts.items()}
            tensors["tokens"] = torch.cat(rows_tokens)
            tensors["index"] = torch.cat(rows_index)
            meta = {"writer": WRITER, "run_id": self.run_id, "chunk": str(number)}
            digest = _atomic_save(tensors, self.out / rel, meta)
            self.shards[rel] = {"chunk": number, "rows": n_real, "sha256": digest}
        self.tokens += n_real
        self.done.append(number)
        self._commit()
        return n_real

    def run(self) -> None:
        self._load()
        done = set(self.done)
        bar = tqdm(total=self.cfg["max_tokens"], unit="tok", unit_scale=True, desc="harvest",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True,
                   smoothing=0.1)  # fmt: skip
        bar.update(self.tokens * self.world)
        n_chunks, total_tokens = 0, 0
        started = time.monotonic()
        try:
            for number, chunk, fraction in _chunks(self.corpus, self.model, self.cfg):
                n_chunks = number + 1
                total_tokens += sum(map(len, chunk))
                if number % self.world != self.rank or number in done:
                    continue
                n = self._chunk(number, chunk)
                if self.log:
                    print(f"resid harvest: rank {self.rank} committed chunk {number} ({n} tokens)",
                          file=sys.stderr, flush=True)  # fmt: skip
                if self.progress:
                    if self.cfg["max_tokens"] is None and fraction > 0:
                        bar.total = max(int(total_tokens / fraction), bar.n + n * self.world)
                    bar.update(n * self.world)
        finally:
            bar.close()
        self._finish(n_chunks, time.monotonic() - started)

    def _finish(self, n_chunks: int, seconds: float) -> None:
        mine = {"stats": {s: st.state() for s, st in self.stats.items()},
                "shards": self.shards, "tokens": self.tokens}  # fmt: skip
        gathered = _gather(mine, self.rank, self.world)
        error = None
        if self.rank == 0:
            try:
                self._write_final(gathered, n_chunks, seconds)
            except Exception as e:
                error = f"rank 0 could not write the merged output: {e}"
                if self.world == 1:
                    raise
        error = _broadcast(error, self.rank, self.world)
        if error:
            raise HarvestError(error)

    def _write_final(self, gathered: list[dict], n_chunks: int, seconds: float) -> None:
        out, cfg = self.out, self.cfg
        listed: dict[str, str] = {}
        shards: dict[str, dict] = {}
        for g in gathered:
            shards.update(g["shards"])
        for rel, info in sorted(shards.items()):
            listed[rel] = info["sha256"]
        if cfg["activations"]:
            expected = {f"shards/{c:06d}.safetensors" for c in range(n_chunks)}
            if set(shards) != expected:
                raise HarvestError(
                    f"shards missing after the run: {sorted(expected - set(shards))[:5]}"
                )
        site_info = {}
        if cfg["stats"]:
            for s in self.sites:
                parts = [g["stats"][s] for g in gathered if s in g["stats"]]
                merged = None
                for part in parts:
                    st = UnitStats.from_state(
                        part, "", cfg["k"], cfg["window"], cfg["active_threshold"]
                    )
                    merged = st if merged is None else merged.merge(st)
                if merged is None:  # no rank saw a token
                    raise HarvestError("no tokens were harvested")
                rel = f"stats/{s}.safetensors"
                meta = {"writer": WRITER, "run_id": self.run_id, "site": s,
                        "window": json.dumps(cfg["window"]), "k": str(cfg["k"])}  # fmt: skip
                listed[rel] = _atomic_save(merged.summary(), out / rel, meta)
                site_info[s] = {"units": merged.n_units, "stats": rel}
        tokens = sum(g["tokens"] for g in gathered)
        info = {
            **cfg,
            "run_id": self.run_id,
            "world_size": self.world,
            "status": "complete",
            "tokens": tokens,
            "contexts_chunks": n_chunks,
            "shards": [
                {"path": rel, **{k: v for k, v in shards[rel].items() if k != "sha256"}}
                for rel in sorted(shards)
            ],  # fmt: skip
            "site_info": site_info,
            "seconds": round(seconds, 3),
        }
        _write_manifest(out, info, listed)
        _cleanup_ranks(out, self.run_id)


# ---- reading a harvest ------------------------------------------------------------------------


def read_harvest(folder: str | Path) -> dict:
    """The manifest's ``harvest`` record of a finished harvest (settings, sites, tokens,
    shards), checked to be complete."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise HarvestError(
            f"{folder} is not a resid harvest folder (no {files.MANIFEST} from resid harvest)"
        )
    info = manifest["harvest"]
    if info.get("status") != "complete":
        raise HarvestError(
            f"{folder} holds an unfinished harvest: finish it with resid harvest --resume"
        )
    return info


def load_stats(folder: str | Path, site: str) -> dict[str, Tensor]:
    """A finished harvest's statistics at ``site``: ``count`` [1]; per unit ``mean``,
    ``var``, ``min``, ``max``, ``frac_active``, ``hist`` [units, 195] (bins between
    ``edges``, see ``default_edges``);
    ``top_values``/``top_index`` [units, k] (NaN/-1 where fewer than k tokens), and
    ``top_tokens``/``top_acts`` [units, k, window] (-1/NaN outside the context).

    >>> s = load_stats("harvest", "blocks.5.mlp.hook_post"); s["max"].argmax()
    """
    folder = Path(folder)
    info = read_harvest(folder)
    if site not in info.get("site_info", {}):
        raise HarvestError(
            f"{folder} has no statistics for {site!r}; it has {list(info.get('site_info', {}))}"
        )
    path = folder / info["site_info"][site]["stats"]
    digest = files.read_manifest(folder)["files"].get(path.relative_to(folder).as_posix())
    if digest is None or files.sha256(path) != digest:
        raise HarvestError(f"{path} changed since resid harvest wrote it")
    return load_file(str(path))


def iter_shards(folder: str | Path) -> Iterator[dict[str, Tensor]]:
    """Each shard of a finished harvest, in corpus order, checked against its hash."""
    folder = Path(folder)
    info = read_harvest(folder)
    listed = files.read_manifest(folder)["files"]
    for shard in info["shards"]:
        path = folder / shard["path"]
        if files.sha256(path) != listed[shard["path"]]:
            raise HarvestError(f"{path} changed since resid harvest wrote it")
        yield load_file(str(path))
