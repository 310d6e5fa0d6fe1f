"""Patching sweeps and attribution patching over a dataset larger than one batch, on one
process or split across the ranks of a torchrun job.

A dataset is any iterable of *items*; an item is one batch of prompt pairs,
``(clean, corrupted)`` or ``(clean, corrupted, metric)`` token ids (``[pos]`` for one
prompt, ``[batch, pos]`` for several) or texts (a string, or a list of strings padded
with ``model.to_tokens``' mask), or a dict with keys ``clean``, ``corrupted`` and
optionally ``metric`` and ``attention_mask``. An item's own metric (its answer tokens,
say) overrides the ``metric`` given for all. Each item is swept as ``sweep(model,
corrupted, clean, metric)`` would sweep it, so the result holds one value per item
(``per_item``, axes ``("item", ...)``: give one prompt per item for per-prompt results)
and their mean weighted by the prompts in each (``mean``: for a metric that averages over
its batch, the mean over every prompt).

The items are taken ``chunk_items`` at a time. Under torchrun (``init_distributed`` from
``resid.core.distributed`` called first) every rank reads the whole iterable and runs
items ``rank, rank + world, ...`` of each chunk; rank 0 gathers them in order, so the
result is one process's, bit for bit (each item is computed alone, and the mean is summed
in item order on rank 0). With ``out``, rank 0 writes each chunk's results to that folder
(``resid.interventions.dataset_store``) and ``resume=True`` continues after a kill from
the first chunk not written, checking that the data it skips is the data it had. A rank
that dies or stops answering fails the others within the process group's timeout with a
:class:`~resid.core.distributed.DistributedError` naming the folder to resume.

>>> pairs = [(clean[i], corrupted[i], metrics.logit_diff(a[i], w[i])) for i in range(1000)]
>>> result = sweep_dataset(model, pairs, site="resid_pre", out="runs/ioi")
>>> result.mean.values.shape, result.per_item.values.shape    # [layer, pos], [1000, layer, pos]

    torchrun --nproc-per-node 2 my_sweep.py     # the same result, in about half the time
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from resid.core.distributed import (
    DistributedError,
    broadcast,
    collective_failure,
    gather,
    rank_and_world,
)
from resid.core.labelled import Labelled
from resid.core.model import Model
from resid.interventions.dataset_store import DatasetError, Store, digest
from resid.interventions.metrics import Metric, MetricFn
from resid.interventions.patching import attribution_patch, sweep

MAX_CHUNK_ITEMS = 1 << 20

#: what runs on one item: fn(model, corrupted, clean, metric, attention_mask) -> Labelled
ItemFn = Callable[[Model, Tensor, Tensor, Metric | MetricFn, Tensor | None], Labelled]


@dataclass(frozen=True)
class DatasetResult:
    """A dataset sweep's results: ``per_item`` (axes ``("item", ...)``), ``mean`` (over the
    items, weighted by ``rows``, the prompts in each), ``baselines`` (each item's
    unpatched metric) and ``rows``.

    >>> result.mean.top(3)                     # the cells that matter most on average
    >>> result.per_item.values[:, 3, -1]       # layer 3, last position, for every item
    """

    per_item: Labelled
    mean: Labelled
    baselines: Float[Tensor, " item"]
    rows: Int[Tensor, " item"]

    def __len__(self) -> int:
        return len(self.rows)


def _item(model: Model, item, metric: Metric | MetricFn | None, index: int):
    """``(clean, corrupted, metric, mask)`` of one item, token ids as ``[batch, pos]``
    (text tokenized here, a list of texts padded and masked by the corrupted side's mask)."""
    if isinstance(item, dict):
        unknown = set(item) - {"clean", "corrupted", "metric", "attention_mask"}
        if unknown or not {"clean", "corrupted"} <= set(item):
            raise DatasetError(
                f"item {index}: a dict item has keys clean, corrupted (and optionally metric, "
                f"attention_mask), not {sorted(item)}"
            )
        parts = (item["clean"], item["corrupted"], item.get("metric"), item.get("attention_mask"))
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        parts = (*item, None) if len(item) == 3 else (*item, None, None)
    else:
        raise DatasetError(
            f"item {index} is a {type(item).__name__}: give (clean, corrupted), (clean, "
            "corrupted, metric) or a dict of token ids"
        )
    clean, corrupted, own, mask = parts
    if _is_text(clean) and _is_text(corrupted):
        clean = model.to_tokens(clean)
        corrupted, padded = model.to_tokens(corrupted, return_attention_mask=True)
        if mask is None and not bool(padded.all()):
            mask = padded
    if not isinstance(clean, Tensor) or not isinstance(corrupted, Tensor):
        raise DatasetError(f"item {index}: clean and corrupted must be texts or token-id tensors")
    clean, corrupted = (t[None] if t.dim() == 1 else t for t in (clean, corrupted))
    if mask is not None and mask.dim() == 1:
        mask = mask[None]
    use = own if own is not None else metric
    if use is None:
        raise DatasetError(f"item {index} has no metric: pass metric= or give each item one")
    return clean, corrupted, use, mask


def run_dataset(
    model: Model,
    data: Iterable,
    fn: ItemFn,
    metric: Metric | MetricFn | None = None,
    *,
    job: dict,
    out: str | Path | None = None,
    resume: bool = False,
    chunk_items: int = 16,
    progress: bool = True,
) -> DatasetResult:
    """Run ``fn`` on every item of ``data`` (see the module's docstring), split across
    the ranks of the process group if there is one; ``job`` (JSON-able) names what ``fn``
    computes, and a resumed run must find it unchanged. Returns the same
    :class:`DatasetResult` on every rank.

    >>> run_dataset(model, pairs, lambda m, c, k, f, a: sweep(m, c, k, f, attention_mask=a,
    ...             progress=False), metric, job={"kind": "sweep"})
    """
    if not isinstance(chunk_items, int) or not 1 <= chunk_items <= MAX_CHUNK_ITEMS:
        raise ValueError(
            f"chunk_items must be an int in [1, {MAX_CHUNK_ITEMS}], not {chunk_items!r}"
        )
    if resume and out is None:
        raise ValueError("resume=True needs the results folder: pass out=")
    rank, world = rank_and_world()
    identity = {**job, "chunk_items": chunk_items}
    store, verdict = None, (0, None)
    if rank == 0 and out is not None:
        try:
            store = Store(out, identity, resume)
            verdict = (store.done, None)
        except (DatasetError, OSError) as e:
            verdict = (0, f"{type(e).__name__}: {e}")
    done, error = broadcast(verdict, rank, world)
    if error is not None:
        raise DatasetError(error if rank == 0 else f"rank 0 could not open {out}: {error}")
    total = len(data) if hasattr(data, "__len__") else None
    bar = tqdm(total=total, unit="item", desc="dataset", disable=not progress or rank != 0)
    kept: list[tuple[Tensor, Tensor, Tensor]] = []  # rank 0: (values, baselines, rows)
    template: dict | None = None  # the results' axes, labels and site
    items = iter(data)
    chunk = 0
    try:
        while batch := list(itertools.islice(items, chunk_items)):
            start = chunk * chunk_items
            parsed = [_item(model, x, metric, start + i) for i, x in enumerate(batch)]
            if chunk < done:  # written before the kill: check it is the same data
                if rank == 0:
                    saved = store.read(chunk)
                    if not torch.equal(saved["digest"], _digest(parsed)):
                        raise DatasetError(
                            f"chunk {chunk} of {out} was computed on other data than items "
                            f"{start}..{start + len(batch) - 1}: resume with the same "
                            "dataset, or start a new folder"
                        )
                    kept.append((saved["values"], saved["baselines"], saved["rows"]))
                    template = store.result
                bar.update(len(batch))
                chunk += 1
                continue
            mine = []
            for i in range(rank, len(parsed), world):
                clean, corrupted, use, mask = parsed[i]
                result = fn(model, corrupted, clean, use, mask)
                mine.append((i, result, len(corrupted)))
                if world == 1:
                    bar.update(1)
            gathered = gather(mine, rank, world)
            if rank == 0:
                results = sorted((r for part in gathered for r in part), key=lambda r: r[0])
                first = results[0][1]
                template = template or {
                    "axes": list(first.axes),
                    "shape": list(first.values.shape),
                    "names": {k: list(v) for k, v in first.names.items()},
                    "site": first.site,
                }
                values = _stack([r[1] for r in results], template, start)
                baselines = torch.tensor([float(r[1].baseline) for r in results])
                rows = torch.tensor([r[2] for r in results], dtype=torch.int64)
                kept.append((values, baselines, rows))
                if store is not None:
                    store.write(chunk, {"values": values, "baselines": baselines,
                                        "rows": rows, "digest": _digest(parsed)}, template)  # fmt: skip
                if world > 1:
                    bar.update(len(batch))
            chunk += 1
        result = _result(kept, template) if rank == 0 else None
        if store is not None:
            store.finish()
        return broadcast(result, rank, world)
    except (RuntimeError, OSError) as e:
        if world == 1 or not collective_failure(e):
            raise
        where = (
            f"; the chunks written so far are in {out}: run every rank again with resume=True"
            if out
            else ""
        )
        raise DistributedError(
            f"rank {rank} of {world}: a collective failed at chunk {chunk} (another rank died, "
            f"was killed, or did not answer within the process group's timeout): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{where}"
        ) from e
    finally:
        bar.close()


def _is_text(x) -> bool:
    return isinstance(x, str) or (
        isinstance(x, list) and bool(x) and all(isinstance(t, str) for t in x)
    )


def _digest(parsed: list) -> Tensor:
    tensors = []
    for clean, corrupted, _, mask in parsed:
        tensors += [clean, corrupted] + ([] if mask is None else [mask])
    return digest(tensors)


def _stack(results: list[Labelled], template: dict, start: int) -> Tensor:
    shape = tuple(template["shape"])
    for i, r in enumerate(results):
        if list(r.axes) != template["axes"] or tuple(r.values.shape) != shape:
            raise DatasetError(
                f"item {start + i}'s result has axes {r.axes} {tuple(r.values.shape)}, the "
                f"first's {tuple(template['axes'])} {tuple(shape)}: items of a dataset "
                "sweep need the same length (pad them, with attention_mask), or by_pos=False"
            )
    return torch.stack([r.values.float() for r in results])


def _result(kept: list, template: dict | None) -> DatasetResult:
    if template is None:
        raise DatasetError("the dataset has no items")
    values = torch.cat([k[0] for k in kept])
    baselines = torch.cat([k[1] for k in kept])
    rows = torch.cat([k[2] for k in kept])
    weights = rows.double() / rows.sum()
    view = (-1,) + (1,) * (values.dim() - 1)
    mean = (values.double() * weights.view(view)).sum(0).float()
    base = float((baselines.double() * weights).sum())
    axes, names, site = tuple(template["axes"]), template["names"], template["site"]
    if values.shape[0] != len(rows) or values.dim() != len(axes) + 1:
        raise DatasetError(f"the results ({tuple(values.shape)}) do not have axes {axes}")
    try:
        per_item = Labelled(values, ("item", *axes), names, site, base)
        mean_l = Labelled(mean, axes, names, site, base)
    except ValueError as e:
        raise DatasetError(f"the results do not match their description: {e}") from e
    return DatasetResult(per_item, mean_l, baselines, rows)


# ---- what runs on each item ----------------------------------------------------------------


def sweep_dataset(
    model: Model,
    data: Iterable,
    metric: Metric | MetricFn | None = None,
    site: str = "resid_pre",
    *,
    by_pos: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    chunk_items: int = 16,
    progress: bool = True,
    **sweep_kwargs,
) -> DatasetResult:
    """``resid.interventions.patching.sweep`` on every item of ``data`` (clean tokens,
    corrupted tokens, optionally a metric each), split across torchrun's ranks; see the
    module's docstring. ``sweep_kwargs`` go to each sweep (``chunk_cells``,
    ``max_memory``).

    >>> result = sweep_dataset(model, pairs, metric, "z", by_pos=False, out="runs/heads")
    >>> result.mean.top(5)                         # [layer, head]
    """

    def one(model, corrupted, clean, use, mask) -> Labelled:
        return sweep(model, corrupted, clean, use, site, by_pos=by_pos, attention_mask=mask,
                     progress=False, **sweep_kwargs)  # fmt: skip

    job = {"kind": "sweep", "site": site, "by_pos": by_pos}
    return run_dataset(model, data, one, metric, job=job, out=out, resume=resume,
                       chunk_items=chunk_items, progress=progress)  # fmt: skip


def attribution_dataset(
    model: Model,
    data: Iterable,
    metric: Metric | MetricFn | None = None,
    site: str = "resid_pre",
    *,
    by_pos: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    chunk_items: int = 16,
    progress: bool = True,
) -> DatasetResult:
    """``resid.interventions.patching.attribution_patch`` on every item of ``data``, split
    across torchrun's ranks; see the module's docstring.

    >>> est = attribution_dataset(model, pairs, metric, "resid_pre")
    >>> est.mean.values.shape                      # [layer, pos]
    """

    def one(model, corrupted, clean, use, mask) -> Labelled:
        return attribution_patch(model, corrupted, clean, use, site, by_pos=by_pos,
                                 attention_mask=mask)  # fmt: skip

    job = {"kind": "attribution", "site": site, "by_pos": by_pos}
    return run_dataset(model, data, one, metric, job=job, out=out, resume=resume,
                       chunk_items=chunk_items, progress=progress)  # fmt: skip
