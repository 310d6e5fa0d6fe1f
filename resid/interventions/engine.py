"""The suffix forward under patching sweeps: run patched copies of a corrupted batch from
the layer where each is patched, on the positions the patch can change, and read the metric.

A patch at layer ``l``, position ``p`` leaves everything before layer ``l`` and every
position before ``p`` as in the corrupted run (attention is causal). So each copy joins the
forward at its own layer, from the corrupted residual stream; each later layer recomputes
positions ``p..`` only, attending over the corrupted run's cached keys and values for
``0..p-1``; and a metric that declares what it reads gets only those logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core import devices, names
from resid.core.layers import KVStore, affine, row_invariant
from resid.core.mask import Mask
from resid.core.model import Model
from resid.core.names import act_name
from resid.interventions.metrics import Metric

# sweep site -> where a patched copy rejoins the forward:
#   "pre": before block l (q/k/v/pattern: with an edit inside its attention),
#   "mid": at resid_mid of block l, "post": after block l.
_REJOIN = {
    "resid_pre": "pre",
    "resid_mid": "mid",
    "resid_post": "post",
    "attn_out": "mid",
    "mlp_out": "post",
    "z": "mid",
    "q": "pre",
    "k": "pre",
    "v": "pre",
    "pattern": "pre",
}
#: sweep site -> (its path within block l, from the table of sites; where a copy rejoins)
SITES = {s: (names.SHORT[s].path, stage) for s, stage in _REJOIN.items()}
#: the sweep sites with a head axis
HEAD_SITES = tuple(s for s in SITES if names.SHORT[s].per_head)


def hook_name(site: str, layer: int) -> str:
    """``hook_name("z", 3) == "blocks.3.attn.hook_z"`` (``resid.act_name``)."""
    return act_name(site, layer)


def scalar(value, name: str = "metric") -> Tensor:
    out = torch.as_tensor(value)
    if out.dim() != 0:
        raise ValueError(
            f"the {name} returned shape {tuple(out.shape)}, not a scalar: reduce over the batch "
            "(e.g. .mean()) inside the metric"
        )
    return out.detach().float().cpu()


# ---- reading the metric off a batch of patched runs -------------------------------------


class Readout:
    """Evaluates the metric on ``n`` patched copies of the batch, computing only the logits
    it declares (all of them for a plain function of logits)."""

    def __init__(
        self, model: Model, metric: Metric, batch: int, n_pos: int, mask: Tensor | None = None
    ):
        self.model, self.metric, self.batch = model, metric, batch
        self.pos = metric.positions(batch, n_pos, attention_mask=mask)
        tokens = metric.token_ids(batch)
        # the unembedding columns of the declared tokens, as rows: [b, k, d]
        self.W_sel = None if tokens is None else model.W_U.T[tokens.to(model.device)]
        # causal: positions after the last one read never matter
        self.n_pos = n_pos if self.pos is None else int(self.pos.max()) + 1
        if self.pos is not None:
            self.pos = self.pos.to(model.device)

    def read_rel(self, start: int, n: int) -> Tensor | None:
        """Each row's read position relative to ``start`` (clamped at 0), for ``n`` copies."""
        return None if self.pos is None else (self.pos - start).clamp(min=0).repeat(n)

    def logits(self, x: Float[Tensor, "... d_model"]) -> Tensor:
        x = self.model.ln_final.plain(x)
        if self.W_sel is None:
            return affine(x, self.model.W_U, None)
        x = x.unflatten(0, (-1, self.batch))  # [n, b, (pos,) d]
        W = self.W_sel if x.dim() == 3 else self.W_sel[:, None]  # [b, (1,) k, d]
        return (x[..., None, :] * W).sum(-1).flatten(0, 1)  # a few columns: no GEMM

    def prepare(self, corr_final: Tensor, corr_logits: Tensor | None) -> None:
        """Remember the corrupted run's final residual (and logits): the unpatched rows."""
        self.corr_final = corr_final
        if self.pos is None:
            sel = corr_logits if self.W_sel is None else self.logits(corr_final)
            self.corr_sel = sel
        else:
            self.corr_read = corr_final[torch.arange(self.batch), self.pos]

    def values(self, x: Tensor, start: int, n: int, at_read: bool) -> list[Tensor]:
        """The metric of each of ``n`` copies; ``x`` holds positions ``start..`` of the final
        residual (``[n*b, 1, d]`` already taken at the read positions if ``at_read``)."""
        b = self.batch
        if self.pos is not None:
            rows = x[:, 0] if at_read else x[torch.arange(n * b), self.read_rel(start, n)]
            before = (self.pos < start).repeat(n)
            rows = torch.where(before[:, None], self.corr_read.repeat(n, 1), rows)
            sel = self.logits(rows)
        else:
            sel = torch.cat([self.corr_sel[:, :start].repeat(n, 1, 1), self.logits(x)], 1)
        return [scalar(self.metric.fn(s)) for s in sel.unflatten(0, (n, b))]

    def baseline(self) -> Tensor:
        if self.pos is not None:
            return scalar(self.metric.fn(self.logits(self.corr_read)))
        return scalar(self.metric.fn(self.corr_sel))


# ---- the suffix forward ----------------------------------------------------------------


@dataclass
class Cell:
    index: tuple[int, ...]  # where its value goes in the result
    layer: int
    mask: Tensor  # which entries it patches: [pos], [pos, head] or [head, pos] (pattern)
    start: int = 0  # first position whose activation the patch changes


class Engine:
    """Runs patched copies of the corrupted batch from their patch site onwards, through
    the model's own blocks (``Block.attend``/``Block.feed``), on positions ``start..`` only,
    with the corrupted run's keys and values for the earlier positions as a frozen KV
    store. An edit inside attention (q, k, v, pattern) is a hook on the copies' rows."""

    def __init__(
        self,
        model: Model,
        site: str,
        corr: dict,
        clean: dict,
        readout: Readout,
        mask: Tensor | None = None,
    ):
        self.model, self.site, self.corr, self.clean = model, site, corr, clean
        self.readout = readout
        self.keys = None if mask is None else mask[:, : readout.n_pos]  # real keys per prompt
        self.stage = SITES[site][1]
        self.L = model.cfg.n_layers
        self.b = readout.batch
        # blocks on several devices (model.to_devices): each copy moves with the stream
        self.devs = None
        if model.layer_devices is not None:
            self.devs = [devices.module_device(block) for block in model.blocks]

    def on(self, layer: int, t: Tensor) -> Tensor:
        """``t`` on block ``layer``'s device (as it is, on one device)."""
        return t if self.devs is None else t.to(self.devs[layer])

    def c(self, site: str, layer: int) -> Tensor:
        return self.corr[hook_name(site, layer)]

    def enter(self, layer: int, cells: list[Cell], start: int) -> tuple[Tensor, Tensor | None]:
        """The joining copies' state at their stage, ``[n*b, S, d_model]``, and for an edit
        inside attention the mask of what to replace (``[n, 1, ...]``)."""
        n, s = len(cells), slice(start, None)
        mask = self.on(layer, torch.stack([c.mask for c in cells]).to(self.model.device))
        clean = self.on(layer, self.clean[hook_name(self.site, layer)])
        resid_pre = self.c("resid_pre", layer)[:, s].repeat(n, 1, 1)
        if self.site == "pattern":
            return resid_pre, mask[:, None, :, s, None]  # [n, 1, head, S, 1]
        if self.site in ("q", "k", "v"):
            return resid_pre, mask[:, None, s, :, None]  # [n, 1, S, head, 1]
        m = mask[:, None, s, :, None] if self.site == "z" else mask[:, None, s, None]
        x = torch.where(m, clean[:, s], self.c(self.site, layer)[:, s]).flatten(0, 1)
        return self.join(layer, x, start), None

    def join(self, layer: int, value: Tensor, start: int) -> Tensor:
        """The stream state, at this site's stage of block ``layer``, of copies whose
        activation at the site (positions ``start..``, ``[n*b, S, ...]``) is ``value``:
        a residual site is the state itself, ``attn_out``/``z`` add to ``resid_pre``,
        ``mlp_out`` to ``resid_mid``. (Patches of SAE features join through it too.)"""
        n, s = len(value) // self.b, slice(start, None)
        if self.site == "z":
            resid_pre = self.c("resid_pre", layer)[:, s].repeat(n, 1, 1)
            return resid_pre + self.model.blocks[layer].attn.project(value)
        if self.site == "attn_out":
            return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1) + value
        if self.site == "mlp_out":
            return self.c("resid_mid", layer)[:, s].repeat(n, 1, 1) + value
        return value

    def attend(self, layer: int, x: Tensor, start: int, edit: Tensor | None = None) -> Tensor:
        """Block ``layer``'s attention half (a parallel block: all of it) on positions ``start..`` of ``x``'s copies, over
        the corrupted keys and values before ``start``; ``edit`` replaces the site's entries
        of every row (all are joining copies) with the clean run's."""
        reps = len(x) // self.b
        k = "rot_k" if self.model.cfg.positional == "rotary" else "k"  # keys as attention saw them
        kv = KVStore(
            self.c(k, layer)[:, :start].repeat(reps, 1, 1, 1),
            self.c("v", layer)[:, :start].repeat(reps, 1, 1, 1),
            frozen=True,
        )
        block = self.model.blocks[layer]
        mask = Mask(start, None if self.keys is None else self.keys.repeat(reps, 1))
        run = block if block.parallel else block.attend  # a parallel block runs whole
        if edit is None:
            return run(x, mask, kv if start else None)
        clean = self.clean[hook_name(self.site, layer)]
        clean = (
            clean[:, :, start:, : x.shape[1] + start]
            if self.site == "pattern"
            else clean[:, start:]
        )

        def replace(act: Tensor, hook) -> Tensor:
            act = act.unflatten(0, (-1, self.b))
            return torch.where(edit, clean.to(act), act).flatten(0, 1)

        with self.model.hooks([(hook_name(self.site, layer), replace)]):
            return run(x, mask, kv if start else None)

    def run(self, cells: list[Cell], start: int) -> dict[int, Tensor]:
        """See ``_run``; every projection pads to 16 rows, so chunking changes no bit."""
        with row_invariant():
            return self._run(cells, start)

    def _run(self, cells: list[Cell], start: int) -> dict[int, Tensor]:
        """The metric of each cell (all sharing ``start``; by ``id``), in one batched pass.

        The running copies ``x`` enter each block at resid_pre; a cell's copy joins them at
        its own layer, before the block, at resid_mid or after it (its ``stage``). Copies
        with an edit inside attention run that block's attention on their own, so a row's
        numbers never depend on which rows share its chunk. In the last block, a metric
        that reads one position per prompt keeps only that position before the MLP."""
        order: list[Cell] = []
        x = None
        read_one = self.readout.pos is not None
        for layer in range(min(c.layer for c in cells), self.L):
            joining = [c for c in cells if c.layer == layer]
            stage, state, edit = None, None, None
            if joining:
                stage = self.stage
                state, edit = self.enter(layer, joining, start)
            last = layer == self.L - 1
            if x is not None:
                x = self.attend(layer, self.on(layer, x), start)
            if stage == "pre":
                state = self.attend(layer, state, start, edit)
            if last and read_one:
                x = None if x is None else self._at_read(x, start)
                state = None if state is None else self._at_read(state, start)
            if stage in ("pre", "mid"):
                x = _cat(x, state)
            if x is not None and not self.model.blocks[layer].parallel:
                x = self.model.blocks[layer].feed(x)
            if stage == "post":
                x = _cat(x, state)
            order += joining
        if self.devs is not None:  # the readout (ln_final, W_U) is on the model's device
            x = x.to(self.model.device)
        values = self.readout.values(x, start, len(order), read_one)
        return {id(c): v for c, v in zip(order, values, strict=True)}

    def _at_read(self, x: Tensor, start: int) -> Tensor:
        """Each copy's row at its read position: ``[N, 1, d_model]``."""
        rows = self.readout.read_rel(start, len(x) // self.b).to(x.device)
        return x[torch.arange(len(x), device=x.device), rows][:, None]


def _cat(x: Tensor | None, more: Tensor) -> Tensor:
    return more if x is None else torch.cat([x, more])
