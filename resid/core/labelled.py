"""Labelled: one result type for every table of numbers resid hands back.

A decomposition (``[component, batch, pos, d_model]``), a direct logit attribution
(``[component, batch, pos]``), a patching sweep (``[layer, pos]``, ``[layer, pos, head]``,
…) and detector scores (``[layer, head]``) are all a tensor whose axes have names and
whose entries along some axes have labels. ``Labelled`` holds exactly that.

>>> parts = cache.decompose_resid(3, "mid")          # Labelled, axes ("component", "batch", "pos", "d_model")
>>> parts["L2H5"].shape                             # [batch, pos, d_model]
>>> parts.sum()                                      # the stream itself
>>> result = patching.sweep(...)                      # Labelled, axes ("layer", "pos")
>>> result.argmax()                                  # {"layer": 3, "pos": 4}
>>> result.top(3)                                    # [({"layer": 3, "pos": 4}, 2.1), ...]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

_PREFIX = {"layer": "L", "head": "H"}


@dataclass(frozen=True)
class Labelled:
    """``values`` with named ``axes``; ``names`` labels the entries of some axes (others are
    numbered: ``"L3"`` for layers, ``"H5"`` for heads, ``"4"`` for positions).

    ``site`` says what was measured and ``baseline`` the unpatched value, where they apply.
    The first axis with labels is the *label axis*: ``result["L2H5"]`` indexes it and
    ``result.labels`` lists it.
    """

    values: Tensor
    axes: tuple[str, ...]
    names: Mapping[str, Sequence[str]] = field(default_factory=dict)
    site: str | None = None
    baseline: float | None = None

    def __post_init__(self):
        if len(self.axes) != self.values.dim():
            raise ValueError(f"{len(self.axes)} axis names for a {self.values.dim()}-d tensor")
        for axis, labels in self.names.items():
            n = self.values.shape[self.axes.index(axis)]
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for the {n} entries of axis {axis!r}")

    @classmethod
    def stack(
        cls, labels: Sequence[str], values: Tensor, site: str | None = None, *rest: str
    ) -> Labelled:
        """Parts along a leading ``component`` axis, the rest named ``rest`` (default
        ``batch, pos[, d_model]``)."""
        rest = rest or ("batch", "pos", "d_model")[: values.dim() - 1]
        return cls(values, ("component", *rest), {"component": list(labels)}, site)

    # ---- labels ------------------------------------------------------------------------

    def labels_of(self, axis: str) -> list[str]:
        """The labels along ``axis``: given ones, else numbered (``L0``, ``H3``, ``5``)."""
        if axis in self.names:
            return list(self.names[axis])
        n = self.values.shape[self._axis(axis)]
        return [f"{_PREFIX.get(axis, '')}{i}" for i in range(n)]

    @property
    def label_axis(self) -> str:
        return next(iter(self.names), self.axes[0])

    @property
    def labels(self) -> list[str]:
        """The labels of the label axis (a decomposition's component names)."""
        return self.labels_of(self.label_axis)

    @property
    def components(self) -> Tensor:
        """``values``, under the name decompositions have always used."""
        return self.values

    def _axis(self, axis: str) -> int:
        if axis not in self.axes:
            raise KeyError(f"no axis {axis!r}; the axes are {self.axes}")
        return self.axes.index(axis)

    def __len__(self) -> int:
        return self.values.shape[self._axis(self.label_axis)]

    def __getitem__(self, label: str | int) -> Tensor:
        """The slice of the label axis at ``label`` (a name or an index)."""
        dim = self._axis(self.label_axis)
        if isinstance(label, int):
            return self.values.select(dim, label)
        labels = self.labels
        if label not in labels:
            raise KeyError(
                f"no entry labelled {label!r}; labels are {labels[:6]}{'…' if len(labels) > 6 else ''}"
            )
        return self.values.select(dim, labels.index(label))

    # ---- reductions --------------------------------------------------------------------

    def sum(self) -> Tensor:
        """The sum over the label axis: for a decomposition, the whole it splits."""
        return self.values.sum(self._axis(self.label_axis))

    def query(self, v: Float[Tensor, " d_model"]) -> Labelled:
        """Each part's dot product with ``v``, dropping the ``d_model`` axis."""
        if self.axes[-1] != "d_model":
            raise ValueError(f"query needs a d_model axis; the axes are {self.axes}")
        if not isinstance(v, Tensor) or v.shape != self.values.shape[-1:]:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"query takes v: [d_model={self.values.shape[-1]}], got {got}")
        return Labelled(self.values @ v.to(self.values), self.axes[:-1], self.names, self.site)

    def argmax(self) -> dict[str, int]:
        """The entry with the largest value, by axis name."""
        idx = torch.unravel_index(self.values.argmax(), self.values.shape)
        return {a: int(i) for a, i in zip(self.axes, idx, strict=True)}

    def top(
        self, k: int = 10, batch: int | None = None, pos: int | None = None, by_abs: bool = True
    ) -> list[tuple[str | dict[str, int], float]]:
        """The ``k`` largest entries (by absolute value unless ``by_abs=False``).

        A decomposition or attribution ranks its parts at one ``(batch, pos)`` (default
        ``0, -1``), vector parts by norm, and gives ``(label, value)``. Anything else ranks
        every entry and gives ``({axis: index}, value)``.
        """
        if self.axes[0] == "component" and "batch" in self.axes:
            at = self.values[:, 0 if batch is None else batch, -1 if pos is None else pos]
            value = at if at.dim() == 1 else at.norm(dim=-1)
            order = (value.abs() if by_abs else value).topk(min(k, len(value))).indices
            return [(self.labels[i], value[i].item()) for i in order.tolist()]
        flat = self.values.flatten()
        order = (flat.abs() if by_abs else flat).topk(min(k, flat.numel())).indices
        out = []
        for i in order.tolist():
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append(({a: int(j) for a, j in zip(self.axes, idx, strict=True)}, flat[i].item()))
        return out

    def to_frame(self):
        """A long pandas DataFrame: one row per entry, a column per axis plus ``value``
        (needs pandas)."""
        import pandas as pd  # optional: only this method needs it

        grids = torch.meshgrid(*(torch.arange(n) for n in self.values.shape), indexing="ij")
        cols = {}
        for axis, g in zip(self.axes, grids, strict=True):
            labels = self.labels_of(axis)
            cols[axis] = [labels[i] for i in g.flatten().tolist()]
        cols["value"] = self.values.detach().float().cpu().flatten().numpy()
        return pd.DataFrame(cols)

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        what = f"{self.site}: " if self.site else ""
        base = "" if self.baseline is None else f"; baseline={self.baseline:.4g}"
        if self.names:
            shown = ", ".join(self.labels[:4]) + (", …" if len(self) > 4 else "")
            return f"Labelled({what}{shape}; {shown}{base})"
        return f"Labelled({what}{shape}{base})"


def correlation(a: Labelled | Tensor, b: Labelled | Tensor) -> float:
    """Pearson correlation between the entries of two results (e.g. attribution vs real)."""
    x, y = (t.values if isinstance(t, Labelled) else t for t in (a, b))
    x, y = x.flatten().double(), y.flatten().double()
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])
