"""The suffix forward under patching sweeps: run patched copies of a corrupted batch from
the layer where each is patched, on the positions the patch can change, and read the metric.

A patch at layer ``l``, position ``p`` leaves everything before layer ``l`` and every
position before ``p`` as in the corrupted run (attention is causal). So each copy joins the
forward at its own layer, from the corrupted residual stream; each later layer recomputes
positions ``p..`` only, attending over the corrupted run's cached keys and values for
``0..p-1``; and a metric that declares what it reads gets only those logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from resid.metrics import Metric
from resid.model import Model
from resid.model import affine as model_affine

# site -> (hook name within block l, where a patched copy rejoins the forward)
#   "pre": before block l (q/k/v/pattern: with an edit inside its attention),
#   "mid": at resid_mid of block l, "post": after block l.
SITES = {
    "resid_pre": ("hook_resid_pre", "pre"),
    "resid_mid": ("hook_resid_mid", "mid"),
    "resid_post": ("hook_resid_post", "post"),
    "attn_out": ("hook_attn_out", "mid"),
    "mlp_out": ("hook_mlp_out", "post"),
    "z": ("attn.hook_z", "mid"),
    "q": ("attn.hook_q", "pre"),
    "k": ("attn.hook_k", "pre"),
    "v": ("attn.hook_v", "pre"),
    "pattern": ("attn.hook_pattern", "pre"),
}
HEAD_SITES = ("z", "q", "k", "v", "pattern")


def hook_name(site: str, layer: int) -> str:
    """``hook_name("z", 3) == "blocks.3.attn.hook_z"``."""
    return f"blocks.{layer}.{SITES[site][0]}"


def scalar(value, name: str = "metric") -> Tensor:
    out = torch.as_tensor(value)
    if out.dim() != 0:
        raise ValueError(
            f"the {name} returned shape {tuple(out.shape)}, not a scalar: reduce over the batch "
            "(e.g. .mean()) inside the metric"
        )
    return out.detach().float().cpu()


# ---- reading the metric off a batch of patched runs -------------------------------------

_MIN_ROWS = 16


def affine(
    x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "... d_out"]:
    """``resid.model.affine`` (or ``x @ W`` without ``b``) whose every row is the same however
    many rows run with it: CPU BLAS switches kernels (and rounding) below ~12 rows, so fewer
    rows are padded up. This is what makes a sweep's values independent of its chunk size,
    bit for bit."""
    rows = x.reshape(-1, W.shape[0])
    n = rows.shape[0]
    if n < _MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(_MIN_ROWS - n, rows.shape[1])])
    out = rows @ W if b is None else model_affine(rows, W, b)
    return out[:n].view(*x.shape[:-1], W.shape[1])


class Readout:
    """Evaluates the metric on ``n`` patched copies of the batch, computing only the logits
    it declares (all of them for a plain function of logits)."""

    def __init__(self, model: Model, metric: Metric, batch: int, n_pos: int):
        self.model, self.metric, self.batch = model, metric, batch
        self.pos = metric.positions(batch, n_pos)
        tokens = metric.token_ids(batch)
        self.W_sel = None if tokens is None else model.W_E[tokens.to(model.device)]  # [b, k, d]
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
    """Runs patched copies of the corrupted batch from their patch site onwards, on
    positions ``start..`` only, reading earlier positions' keys and values from the cache."""

    def __init__(self, model: Model, site: str, corr: dict, clean: dict, readout: Readout):
        self.model, self.site, self.corr, self.clean, self.readout = (
            model,
            site,
            corr,
            clean,
            readout,
        )
        self.stage = SITES[site][1]
        cfg = model.cfg
        self.L, self.H, self.E = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.b = readout.batch

    def c(self, site: str, layer: int) -> Tensor:
        return self.corr[hook_name(site, layer)]

    def enter(self, layer: int, cells: list[Cell], start: int):
        """The joining copies' state at their stage, and the attention edit they need."""
        n, s = len(cells), slice(start, None)
        mask = torch.stack([c.mask for c in cells]).to(self.model.device)
        clean = self.clean[hook_name(self.site, layer)]
        if self.site in HEAD_SITES:
            if self.site == "pattern":
                return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1), (mask[:, :, s], clean)
            m = mask[:, None, s, :, None]  # [n, 1, S, head, 1]
            if self.site != "z":
                return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1), (m, clean[:, s])
            z = torch.where(m, clean[:, s], self.c("z", layer)[:, s]).flatten(0, 1)
            attn = self.model.blocks[layer].attn
            out = affine(z.flatten(-2), attn.W_O.view(-1, attn.W_O.shape[-1]), attn.b_O)
            return self.c("resid_pre", layer)[:, s].repeat(n, 1, 1) + out, None
        m = mask[:, None, s, None]  # [n, 1, S, 1]
        x = torch.where(m, clean[:, s], self.c(self.site, layer)[:, s]).flatten(0, 1)
        if self.site == "attn_out":
            x = self.c("resid_pre", layer)[:, s].repeat(n, 1, 1) + x
        elif self.site == "mlp_out":
            x = self.c("resid_mid", layer)[:, s].repeat(n, 1, 1) + x
        return x, None

    def attention(self, layer, x, start, edit, n_edit, read):
        """resid_pre -> resid_mid of block ``layer`` on positions ``start..``; ``edit`` patches
        q/k/v or the pattern of the last ``n_edit`` rows; ``read`` keeps one query per row."""
        blk = self.model.blocks[layer]
        attn, (N, S, _) = blk.attn, x.shape
        h = blk.ln1.plain(x)
        q, k, v = affine(h, attn.W_QKV, attn.b_QKV).view(N, S, 3, self.H, self.E).unbind(2)
        if edit is not None and self.site != "pattern":
            m, clean = edit
            t = {"q": q, "k": k, "v": v}[self.site]
            patched = torch.where(m, clean, t[N - n_edit :].unflatten(0, (-1, self.b)))
            t = torch.cat([t[: N - n_edit], patched.flatten(0, 1)])
            q, k, v = (
                t if name == self.site else a for name, a in zip("qkv", (q, k, v), strict=True)
            )
        if start:
            reps = N // self.b
            k = torch.cat([self.c("k", layer)[:, :start].repeat(reps, 1, 1, 1), k], 1)
            v = torch.cat([self.c("v", layer)[:, :start].repeat(reps, 1, 1, 1), v], 1)
        # rows with a pattern edit build the pattern; all others keep the fused kernel, so a
        # row's numbers never depend on which other rows share its chunk
        e = n_edit if edit is not None and self.site == "pattern" else 0
        head = slice(0, N - e)
        z = self.fused(q[head], k[head], v[head], start, None if read is None else read[head])
        if e:
            tail = slice(N - e, N)
            m, clean = edit
            t = None if read is None else read[tail]
            z = torch.cat([z, self.explicit(q[tail], k[tail], v[tail], start, m, clean, t)])
        if read is not None:  # only the read positions' queries matter
            x = x[torch.arange(N, device=x.device), read][:, None]
        W_O = attn.W_O.view(-1, attn.W_O.shape[-1])
        return x + affine(z.reshape(*z.shape[:2], -1), W_O, attn.b_O)

    def fused(self, q, k, v, start: int, read: Tensor | None) -> Tensor:
        """Causal attention of queries ``start..`` (or one per row at ``read``) through SDPA."""
        qpos = torch.arange(start, start + q.shape[1], device=q.device)
        if read is not None:
            q, qpos = (
                q[torch.arange(len(q), device=q.device), read][:, None],
                (start + read)[:, None],
            )
        allowed = torch.arange(k.shape[1], device=q.device) <= qpos[..., None]  # [(N,) S', T]
        mask = allowed[:, None] if allowed.dim() == 3 else allowed
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2)

    def explicit(self, q, k, v, start: int, m, clean, read: Tensor | None) -> Tensor:
        """Attention with the pattern built, and the patched cells' rows of it replaced."""
        S, T = q.shape[1], k.shape[1]
        qpos = torch.arange(start, start + S, device=q.device)
        allowed = torch.arange(T, device=q.device) <= qpos[:, None]
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(self.E)).masked_fill(
            ~allowed, float("-inf")
        )
        pattern = scores.float().softmax(-1).to(v.dtype).unflatten(0, (-1, self.b))
        m = m[:, None, :, :, None]  # [n, 1, head, S, 1]
        pattern = torch.where(m, clean[:, :, start:, :T], pattern).flatten(0, 1)
        z = (pattern @ vh).transpose(1, 2)  # [N, S, head, d_head]
        return z if read is None else z[torch.arange(len(z), device=z.device), read][:, None]

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        blk = self.model.blocks[layer]
        mlp = blk.mlp
        h = blk.ln2.plain(x)
        post = F.gelu(affine(h, mlp.W_in, mlp.b_in), approximate=mlp.approximate)
        return x + affine(post, mlp.W_out, mlp.b_out)

    def run(self, cells: list[Cell], start: int) -> dict[int, Tensor]:
        """The metric of each cell (all sharing ``start``; by ``id``), in one batched pass.

        The running copies ``x`` enter each block at resid_pre; a cell's copy joins them at
        its own layer, before the block, at resid_mid or after it (its ``stage``). In the
        last block, a metric that reads one position per prompt needs only that query."""
        order: list[Cell] = []
        x = None
        for layer in range(min(c.layer for c in cells), self.L):
            joining = [c for c in cells if c.layer == layer]
            stage, state, edit = None, None, None
            if joining:
                stage, (state, edit) = self.stage, self.enter(layer, joining, start)
            read = None
            if layer == self.L - 1 and self.readout.pos is not None:
                read = partial(self.readout.read_rel, start)
                if stage in ("mid", "post"):
                    state = state[torch.arange(len(state)), read(len(joining))][:, None]
            if stage == "pre":
                x = _cat(x, state)
            if x is not None:
                n_edit = len(state) if stage == "pre" else 0
                rows = None if read is None else read(len(x) // self.b)
                x = self.attention(layer, x, start, edit, n_edit, rows)
            if stage == "mid":
                x = _cat(x, state)
            if x is not None:
                x = self.mlp(layer, x)
            if stage == "post":
                x = _cat(x, state)
            order += joining
        values = self.readout.values(x, start, len(order), self.readout.pos is not None)
        return {id(c): v for c, v in zip(order, values, strict=True)}


def _cat(x: Tensor | None, more: Tensor) -> Tensor:
    return more if x is None else torch.cat([x, more])
