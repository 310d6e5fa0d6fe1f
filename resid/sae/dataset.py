"""SAE feature attribution over a dataset larger than one batch, on one process or split
across torchrun's ranks: ``resid.sae.circuits.attribute_features`` on every item, run by
the dataset driver of ``resid.interventions.dataset`` (items, chunks, results folder,
resume and the gathered result are as there).

>>> with model.saes([sae]):
...     result = attribute_features_dataset(model, pairs, metric, [sae], out="runs/features")
>>> result.mean.top(10)                            # [feature]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from resid.core.labelled import Labelled
from resid.core.model import Model
from resid.interventions.dataset import DatasetResult, run_dataset
from resid.interventions.metrics import Metric, MetricFn
from resid.sae.circuits import attribute_features
from resid.sae.features import Dictionary


def attribute_features_dataset(
    model: Model,
    data: Iterable,
    metric: Metric | MetricFn | None,
    saes: Dictionary | Sequence[Dictionary],
    *,
    by_pos: bool = False,
    out: str | Path | None = None,
    resume: bool = False,
    chunk_items: int = 16,
    progress: bool = True,
) -> DatasetResult:
    """Attribution patching over every feature of the spliced ``saes`` (run inside
    ``with model.saes([...])``) for every item of ``data`` (clean tokens, corrupted tokens,
    optionally a metric each): ``per_item`` ``[item, feature]`` and their ``mean``.

    >>> with model.saes([sae]):
    ...     result = attribute_features_dataset(model, pairs, metric, [sae])
    """
    saes = [saes] if isinstance(saes, Dictionary) else list(saes)

    def one(model, corrupted, clean, use, mask) -> Labelled:
        return attribute_features(model, corrupted, clean, use, saes, by_pos=by_pos,
                                  attention_mask=mask)  # fmt: skip

    job = {"kind": "features", "saes": [s.hook_name for s in saes],
           "d_sae": [s.d_sae for s in saes], "by_pos": by_pos}  # fmt: skip
    return run_dataset(model, data, one, metric, job=job, out=out, resume=resume,
                       chunk_items=chunk_items, progress=progress)  # fmt: skip
