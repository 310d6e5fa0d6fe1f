"""The layer kernels: LayerNorm, attention, MLP and the block that adds them to the stream.

One convention, stated once: activations are rows and weights multiply on the right,
``x @ W``. So ``W_in: [d_model, d_mlp]`` reads from the residual stream and
``W_out: [d_mlp, d_model]`` writes to it; GPT-2's ``Conv1D`` checkpoints already store
weights this way (``resid.io.loading`` transposes nanoGPT's ``nn.Linear`` ones).

There is one forward path. The model's output always comes from the same kernels
(``F.layer_norm``, ``scaled_dot_product_attention``, one fused GEMM per projection),
whatever is hooked. When a hook or the cache wants a value those kernels never build (the
attention scores and pattern, LayerNorm's scale, each head's result) it is computed
beside them, and the output is rebuilt from it only if a hook changed it. Everything that
re-runs part of the model (patching sweeps, generation with a KV cache) calls these
same modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from resid.core.config import Config
from resid.core.hooks import HookPoint

_MIN_ROWS = 16


def affine(
    x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "... d_out"]:
    """``x @ W + b`` as one GEMM (what GPT-2's ``Conv1D`` does).

    Each row's result is the same however many rows run with it: CPU BLAS switches
    kernels (and rounding) below ~12 rows, so fewer rows are padded up to 16. This is what
    makes a patching sweep independent of its chunk size, and one generated position equal
    to the same position in a longer run, bit for bit."""
    rows = x.reshape(-1, W.shape[0])
    n = rows.shape[0]
    if n < _MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(_MIN_ROWS - n, rows.shape[1])])
    out = rows @ W if b is None else torch.addmm(b, rows, W)
    return out[:n].view(*x.shape[:-1], W.shape[1])


@dataclass(frozen=True)
class Mask:
    """Which keys the queries of one forward may attend to.

    ``offset`` is the position of the first query in the whole sequence (the length of a
    KV cache before it); ``keys`` marks the real (non-padding) keys, past and new, per row
    (``None``: all real). With neither, attention is plainly causal.
    """

    offset: int = 0
    keys: Bool[Tensor, "batch key_pos"] | None = None

    @property
    def causal_only(self) -> bool:
        return self.offset == 0 and self.keys is None

    def allowed(self, n_q: int, n_k: int, device: torch.device) -> Bool[Tensor, "batch 1 q k"]:
        """``allowed[b, 0, i, j]``: query ``i`` may read key ``j``. Every query may read
        itself, so a padding query attends somewhere and never yields NaN."""
        q = torch.arange(self.offset, self.offset + n_q, device=device)[:, None]
        k = torch.arange(n_k, device=device)[None]
        allowed = (k <= q)[None, None]
        if self.keys is not None:
            allowed = (allowed & self.keys[:, None, None, :].to(device)) | (k == q)
        return allowed


class LayerNorm(nn.Module):
    """``normalized * w + b`` with ``normalized = (x - mean) / scale`` and
    ``scale = sqrt(var + eps)``. ``hook_scale`` and ``hook_normalized`` (before the gain
    and bias: TransformerLens' meaning) are computed in fp32 beside the fused kernel."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1], fp32
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        out = self.plain(x)
        if not (self.hook_scale.active or self.hook_normalized.active):
            return out
        centred = x.float() - x.float().mean(-1, keepdim=True)
        scale = self.scale(x)
        scale_seen = self.hook_scale(scale)
        normalized = (centred / scale_seen).to(x.dtype)
        normalized_seen = self.hook_normalized(normalized)
        if scale_seen is scale and normalized_seen is normalized:
            return out  # only observed
        return normalized_seen * self.w + self.b

    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """``sqrt(var(x) + eps)`` in fp32: the number each state is divided by."""
        x = x.float()
        var = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True)
        return (var + self.eps).sqrt()

    def plain(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """This LayerNorm with no hook points, on ``x``'s device and in its dtype: the
        kernel ``forward`` uses, for code that applies it to other states (lenses, neurons)."""
        return F.layer_norm(x, self.w.shape, self.w.to(x), self.b.to(x), self.eps)


class Attention(nn.Module):
    """Each head is four linear maps: W_Q, W_K, W_V read the stream, W_O writes to it.

    The three reading maps of every head live in one fused matrix (GPT-2's ``c_attn``);
    ``W_Q``, ``W_K``, ``W_V`` and their biases are per-head views of it.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d, h, e = cfg.d_model, cfg.n_heads, cfg.d_head
        self.W_QKV = nn.Parameter(torch.empty(d, 3 * h * e))
        self.b_QKV = nn.Parameter(torch.zeros(3 * h * e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.hook_q = HookPoint(copy=True)  # [batch, pos, head, d_head]
        self.hook_k = HookPoint(copy=True)
        self.hook_v = HookPoint(copy=True)
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], fp32, -inf masked
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos], fp32
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]

    def _split(self, t: Tensor, i: int) -> Tensor:
        return rearrange(t, "... (three h e) -> three ... h e", three=3, h=self.cfg.n_heads)[i]

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return rearrange(self._split(self.W_QKV, 0), "d h e -> h d e")

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return rearrange(self._split(self.W_QKV, 1), "d h e -> h d e")

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return rearrange(self._split(self.W_QKV, 2), "d h e -> h d e")

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self._split(self.b_QKV, 0)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._split(self.b_QKV, 1)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._split(self.b_QKV, 2)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Mask = Mask(),
        kv: KVStore | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention of the new positions ``x`` over the keys of ``kv`` (earlier positions,
        then extended with these) and their own, as ``mask`` allows."""
        batch, pos, _ = x.shape
        h, e = self.cfg.n_heads, self.cfg.d_head
        q, k, v = affine(x, self.W_QKV, self.b_QKV).view(batch, pos, 3, h, e).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if kv is not None:
            k, v = kv.extend(k, v)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        allowed = None if mask.causal_only else mask.allowed(pos, kh.shape[2], x.device)
        z = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, is_causal=allowed is None)
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self._observed(qh, kh, vh, allowed, z)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        out = self.project(z)
        if self.hook_result.active:
            result = einsum(z, self.W_O, "b p h e, h e d -> b p h d")
            seen = self.hook_result(result)
            if seen is not result:
                return seen.sum(2) + self.b_O
        return out

    def project(
        self, z: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Every head's ``z @ W_O`` summed, plus ``b_O``: one GEMM over the heads' concatenation."""
        h, e = self.cfg.n_heads, self.cfg.d_head
        return affine(z.reshape(*z.shape[:-2], h * e), self.W_O.view(h * e, -1), self.b_O)

    def _observed(self, qh, kh, vh, allowed, z: Tensor) -> Tensor:
        """Build the scores and pattern (fp32) for the hooks; ``z`` stays the fused
        kernel's unless a hook changed one of them."""
        scores = qh.float() @ kh.float().transpose(-1, -2) / math.sqrt(self.cfg.d_head)
        if allowed is None:
            n_q, n_k = scores.shape[-2:]
            allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        scores_seen = self.hook_attn_scores(scores)
        pattern = scores_seen.softmax(-1)
        pattern_seen = self.hook_pattern(pattern)
        if scores_seen is scores and pattern_seen is pattern:
            return z  # only observed
        return (pattern_seen @ vh.float()).to(vh.dtype)


class MLP(nn.Module):
    """Neuron i reads the stream along ``W_in[:, i]`` and writes ``W_out[i]``, scaled by
    GELU of what it read."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        self.approximate = "tanh" if cfg.act_fn == "gelu_new" else "none"

    def act(self, pre: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_mlp"]:
        return F.gelu(pre, approximate=self.approximate)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(affine(x, self.W_in, self.b_in))
        post = self.hook_post(self.act(pre))
        return affine(post, self.W_out, self.b_out)


class Block(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``, then
    ``resid_post = resid_mid + mlp(ln2(resid_mid))``: two reads and two writes."""

    def __init__(self, cfg: Config):
        super().__init__()
        # registered in the order the forward pass reaches them, so hook_names reads in order
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = LayerNorm(cfg)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2 = LayerNorm(cfg)
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Mask = Mask(),
        kv: KVStore | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        return self.feed(self.attend(resid, mask, kv))

    def attend(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Mask = Mask(),
        kv: KVStore | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """resid_pre -> resid_mid: the attention half."""
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), mask, kv))
        return self.hook_resid_mid(resid_pre + attn_out)

    def feed(
        self, resid_mid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """resid_mid -> resid_post: the MLP half."""
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class KVStore:
    """One layer's keys and values for the positions already run, ``[batch, pos, head,
    d_head]``: ``extend`` appends the new positions' and returns all of them."""

    def __init__(self, k: Tensor | None = None, v: Tensor | None = None, frozen: bool = False):
        self.k, self.v, self.frozen = k, v, frozen

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        if not self.frozen:
            self.k, self.v = k, v
        return k, v
