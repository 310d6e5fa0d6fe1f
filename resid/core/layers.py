"""The layer kernels: LayerNorm, attention, MLP and the block that adds them to the stream.

One convention, stated once: activations are rows and weights multiply on the right,
``x @ W``. So ``W_in: [d_model, d_mlp]`` reads from the residual stream and
``W_out: [d_mlp, d_model]`` writes to it; GPT-2's ``Conv1D`` checkpoints already store
weights this way (``resid.io.loading`` transposes nanoGPT's ``nn.Linear`` ones).

There is one forward path. The model's output always comes from the same kernels
(``F.layer_norm``, ``scaled_dot_product_attention``, one fused GEMM per projection),
whatever is hooked. When a hook or the cache wants a value those kernels never build (the
attention scores and pattern, LayerNorm's scale, each head's result) it is computed
beside them, and the output is rebuilt from it only if a hook changed its values (handed
back equal, it keeps the kernels' output: ``kept``). The mask every block shares is
``resid.core.mask.Mask``. Everything that
re-runs part of the model (patching sweeps, generation with a KV cache) calls these
same modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn

from resid.core.config import Config
from resid.core.hooks import HookPoint
from resid.core.mask import CAUSAL, Mask
from resid.core.rotary import Rotary

_MIN_ROWS: ContextVar[int] = ContextVar("resid_min_rows", default=0)


@contextmanager
def row_invariant(rows: int = 16) -> Iterator[None]:
    """Within the block, every projection runs on at least ``rows`` rows (fewer are padded
    with zeros), so each row's result is the same however many rows run with it: CPU BLAS
    switches kernels (and rounding) below ~12 rows. The patching engine runs under it, which
    makes a sweep's values independent of its chunk size, bit for bit. The plain forward
    does not pad: one generated token stays one row."""
    token = _MIN_ROWS.set(rows)
    try:
        yield
    finally:
        _MIN_ROWS.reset(token)


def affine(
    x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "... d_out"]:
    """``x @ W + b`` as one GEMM (what GPT-2's ``Conv1D`` does); see ``row_invariant``."""
    rows = x.reshape(-1, W.shape[0])
    n, least = rows.shape[0], _MIN_ROWS.get()
    if n < least:
        rows = torch.cat([rows, rows.new_zeros(least - n, rows.shape[1])])
    out = rows @ W if b is None else torch.addmm(b, rows, W)
    return out[:n].view(*x.shape[:-1], W.shape[1])


def through(value: Tensor, path: Tensor) -> Tensor:
    """``value``, exactly, with the gradient of ``path`` (a recomputation of the same value
    through hooked sites): how a backward hook on a site computed beside the fused kernels
    (a pattern, a scale) sees the output's gradient without changing the output."""
    return value.detach() + (path - path.detach())


def kept(changed: bool, seen: Tensor, original: Tensor) -> bool:
    """True when a hook left an activation's values as they were: untouched, or replaced by
    a tensor equal to it bit for bit (an SAE spliced with its error term, a run patched into
    itself). The layer's output is then its fused kernel's, so that writing the same values
    changes nothing. An activation edited in place is the original itself, so it never
    counts as kept."""
    return not changed or (seen is not original and torch.equal(seen, original))


class _Norm(nn.Module):
    """What LayerNorm and RMSNorm share: the output is always the fused ``plain`` kernel;
    ``hook_scale`` ([batch, pos, 1], fp32) and ``hook_normalized`` (before the gain and
    bias: TransformerLens' meaning) are computed beside it when hooked, and the output is
    rebuilt from them only if a hook changed one."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.hook_scale = HookPoint(copy=True)  # [batch, pos, 1], fp32
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        out = self.plain(x)
        if not (self.hook_scale.active or self.hook_normalized.active):
            return out
        centred = self.centre(x.float())
        scale = self._scale_of(centred)
        scale_seen, scale_changed = self.hook_scale.see(scale)
        normalized = (centred / scale_seen).to(x.dtype)
        normalized_seen, normalized_changed = self.hook_normalized.see(normalized)
        if not (
            kept(scale_changed, scale_seen, scale)
            and kept(normalized_changed, normalized_seen, normalized)
        ):
            return self.gain(normalized_seen)
        # the same values (observed, or handed back): the kernel's output, with the gradient
        # the hooks' way when a hook replaced a value or a backward hook waits
        if (scale_changed or normalized_changed or self.hook_scale.grad_wanted
                or self.hook_normalized.grad_wanted):  # fmt: skip
            return through(out, self.gain(normalized_seen))
        return out

    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """The number each state is divided by, in fp32."""
        return self._scale_of(self.centre(x.float()))

    def _scale_of(self, centred: Tensor) -> Tensor:
        return (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()


class LayerNorm(_Norm):
    """``normalized * w + b`` with ``normalized = (x - mean) / scale`` and
    ``scale = sqrt(var + eps)``."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def centre(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True)

    def gain(self, normalized: Tensor) -> Tensor:
        return normalized * self.w + self.b

    def plain(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """This LayerNorm with no hook points, on ``x``'s device and in its dtype: the
        kernel ``forward`` uses, for code that applies it to other states (lenses, neurons)."""
        return F.layer_norm(x, self.w.shape, self.w.to(x), self.b.to(x), self.eps)


class RMSNorm(_Norm):
    """``normalized * w`` with ``normalized = x / scale`` and ``scale = sqrt(mean(x²) + eps)``
    (Llama's norm: no centring, no bias), computed in fp32 as Hugging Face does."""

    def centre(self, x: Tensor) -> Tensor:
        return x

    def gain(self, normalized: Tensor) -> Tensor:
        return normalized * self.w

    def plain(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """This RMSNorm with no hook points, in ``x``'s dtype (the scale in fp32)."""
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.w.to(x) * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class _Pre:
    """A norm whose gain and bias were folded into the weights that read it
    (``resid.process_weights``; TransformerLens' ``LNPre`` / ``RMSPre``): it only
    normalises. ``w`` (ones) and ``b`` (zeros) are constant buffers, not parameters, so
    code written for a gained norm reads the identity it now is."""

    def _unit(self, cfg: Config, bias: bool) -> None:
        del self.w  # the parameter _Norm made: there is no gain to learn
        self.register_buffer("w", torch.ones(cfg.d_model), persistent=False)
        if bias:
            self.register_buffer("b", torch.zeros(cfg.d_model), persistent=False)

    def gain(self, normalized: Tensor) -> Tensor:
        return normalized


class LNPre(_Pre, LayerNorm):
    """``(x - mean) / scale``: LayerNorm without gain or bias."""

    def __init__(self, cfg: Config):
        _Norm.__init__(self, cfg)
        self._unit(cfg, bias=True)

    def plain(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """This norm with no hook points, in ``x``'s dtype."""
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps)


class RMSPre(_Pre, RMSNorm):
    """``x / scale``: RMSNorm without gain (the scale in fp32)."""

    def __init__(self, cfg: Config):
        RMSNorm.__init__(self, cfg)
        self._unit(cfg, bias=False)

    def plain(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """This norm with no hook points, in ``x``'s dtype (the scale in fp32)."""
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def norm(cfg: Config) -> LayerNorm | RMSNorm:
    """The normalisation ``cfg`` names."""
    kinds = {"LN": LayerNorm, "RMS": RMSNorm, "LNPre": LNPre, "RMSPre": RMSPre}
    return kinds[cfg.normalization](cfg)


class Attention(nn.Module):
    """Each head is four linear maps: W_Q, W_K, W_V read the stream, W_O writes to it.

    The reading maps of every head live in one fused matrix (GPT-2's ``c_attn``), queries
    first, then keys, then values; ``W_Q``, ``W_K``, ``W_V`` and their biases are per-head
    views of it. With grouped-query attention (``n_kv_heads < n_heads``) each key/value
    head serves ``n_heads / n_kv_heads`` consecutive query heads: ``W_K``/``W_V`` are then
    ``[n_kv_heads, d_model, d_head]``, and ``hook_k``/``hook_v`` have ``n_kv_heads`` heads.
    Rotary models rotate q and k by position after ``hook_q``/``hook_k``
    (``hook_rot_q``/``hook_rot_k`` see the result).
    """

    def __init__(self, cfg: Config, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        d, h, kv, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.window = cfg.window(layer)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else e**-0.5
        self.W_QKV = nn.Parameter(torch.empty(d, (h + 2 * kv) * e))
        self.b_QKV = nn.Parameter(torch.zeros((h + 2 * kv) * e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.rotary = Rotary(cfg) if cfg.positional == "rotary" else None
        self.hook_q = HookPoint(copy=True)  # [batch, pos, head, d_head]
        self.hook_k = HookPoint(copy=True)  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint(copy=True)
        if self.rotary is not None:
            self.hook_rot_q = HookPoint(copy=True)  # q and k after rotation
            self.hook_rot_k = HookPoint(copy=True)
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], fp32, -inf masked
        # copies: in-place edits must not touch tensors autograd saved (softmax's, SDPA's)
        self.hook_pattern = HookPoint(copy=True)  # [batch, head, query_pos, key_pos], fp32
        self.hook_z = HookPoint(copy=True)  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]

    def _part(self, t: Tensor, i: int) -> Tensor:
        """Queries (0), keys (1) or values (2) of a fused ``[..., (h + 2 kv) e]`` tensor,
        as ``[..., heads, d_head]`` views."""
        h, kv, e = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.d_head
        sizes = (h * e, kv * e, kv * e)
        start = sum(sizes[:i])
        part = t[..., start : start + sizes[i]]
        return part.unflatten(-1, (-1, e))

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return rearrange(self._part(self.W_QKV, 0), "d h e -> h d e")

    @property
    def W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return rearrange(self._part(self.W_QKV, 1), "d h e -> h d e")

    @property
    def W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return rearrange(self._part(self.W_QKV, 2), "d h e -> h d e")

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self._part(self.b_QKV, 0)

    @property
    def b_K(self) -> Float[Tensor, "kv_head d_head"]:
        return self._part(self.b_QKV, 1)

    @property
    def b_V(self) -> Float[Tensor, "kv_head d_head"]:
        return self._part(self.b_QKV, 2)

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads through (itself without GQA)."""
        return head // (self.cfg.n_heads // self.cfg.kv_heads)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Mask = CAUSAL,
        kv: KVStore | None = None,
        qkv: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention of the new positions ``x`` over the keys of ``kv`` (earlier positions,
        then extended with these) and their own, as ``mask`` allows. ``qkv``: the queries,
        keys and values ``[batch, pos, heads, d_head]`` when the block computed them itself
        (from per-head inputs: ``hook_q_input`` and its siblings)."""
        batch, pos, _ = x.shape
        if qkv is None:
            fused = affine(x, self.W_QKV, self.b_QKV)
            qkv = (self._part(fused, 0), self._part(fused, 1), self._part(fused, 2))
        q, k, v = self.hook_q(qkv[0]), self.hook_k(qkv[1]), self.hook_v(qkv[2])
        if self.rotary is not None:
            cos, sin = mask.derived(  # the same for every block
                ("angles", pos, x.device, self.rotary.dims),
                lambda: self.rotary.angles(mask.positions(pos, x.device)),
            )
            q = self.hook_rot_q(self.rotary(q, cos, sin))
            k = self.hook_rot_k(self.rotary(k, cos, sin))
        if kv is not None:
            k, v = kv.extend(k, v)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        plain = mask.causal_only and self.window is None
        n_k = kh.shape[2]
        allowed = (
            None
            if plain
            else mask.derived(
                ("allowed", pos, n_k, x.device, self.window),
                lambda: mask.allowed(pos, n_k, x.device, self.window),
            )
        )
        grouped = self.cfg.kv_heads != self.cfg.n_heads
        z = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=allowed, is_causal=plain, scale=self.scale, enable_gqa=grouped
        )
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self._observed(qh, kh, vh, allowed, z)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        out = self.project(z)
        if self.hook_result.active:
            result = einsum(z, self.W_O, "b p h e, h e d -> b p h d")
            seen, changed = self.hook_result.see(result)
            if not kept(changed, seen, result):
                return seen.sum(2) + self.b_O
            if changed or self.hook_result.grad_wanted:
                return through(out, seen.sum(2) + self.b_O)
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
        group = self.cfg.n_heads // self.cfg.kv_heads
        if group > 1:  # each key/value head, once per query head it serves
            kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        scores = qh.float() @ kh.float().transpose(-1, -2) * self.scale
        if allowed is None:
            n_q, n_k = scores.shape[-2:]
            allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        scores_seen, scores_changed = self.hook_attn_scores.see(scores)
        pattern = scores_seen.softmax(-1)
        pattern_seen, pattern_changed = self.hook_pattern.see(pattern)

        def rebuilt() -> Tensor:  # z from the pattern the hooks left
            return (pattern_seen @ vh.float()).to(vh.dtype)

        if not (
            kept(scores_changed, scores_seen, scores)
            and kept(pattern_changed, pattern_seen, pattern)
        ):
            return rebuilt()
        # the same values (observed, or handed back): the kernel's z, the gradient the hooks' way
        if (scores_changed or pattern_changed or self.hook_attn_scores.grad_wanted
                or self.hook_pattern.grad_wanted):  # fmt: skip
            return through(z, rebuilt())
        return z  # only observed


_ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),  # GPT-2's tanh GELU
    "gelu": F.gelu,  # exact
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """Neuron i reads the stream along ``W_in[:, i]`` and writes ``W_out[i]``, scaled by
    its activation of what it read. A gated MLP (SwiGLU) reads twice: ``act(x · W_gate[:, i])``
    times ``x · W_in[:, i]`` (``hook_pre`` is the gate's pre-activation,
    ``hook_pre_linear`` the other read, as in TransformerLens)."""

    def __init__(self, cfg: Config):
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        self.gated = cfg.gated_mlp
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(d, m))
            self.b_gate = nn.Parameter(torch.zeros(m))
        self.W_in = nn.Parameter(torch.empty(d, m))
        self.b_in = nn.Parameter(torch.zeros(m))
        self.W_out = nn.Parameter(torch.empty(m, d))
        self.b_out = nn.Parameter(torch.zeros(d))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        if self.gated:
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        self.act = _ACTIVATIONS[cfg.act_fn]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.gated:
            pre = self.hook_pre(affine(x, self.W_gate, self.b_gate))
            linear = self.hook_pre_linear(affine(x, self.W_in, self.b_in))
            post = self.hook_post(self.act(pre) * linear)
        else:
            pre = self.hook_pre(affine(x, self.W_in, self.b_in))
            post = self.hook_post(self.act(pre))
        return affine(post, self.W_out, self.b_out)


class Block(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``, then
    ``resid_post = resid_mid + mlp(ln2(resid_mid))``: two reads and two writes. A parallel
    block (GPT-NeoX, Pythia) reads both from ``resid_pre`` and has no ``resid_mid``:
    ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``."""

    def __init__(self, cfg: Config, layer: int = 0):
        super().__init__()
        self.parallel = cfg.parallel_attn_mlp
        # registered in the order the forward pass reaches them, so hook_names reads in order
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        # the stream attention reads, per head, before ln1 (TransformerLens' split inputs):
        # built only when hooked; see read_attention
        self.hook_attn_in = HookPoint()  # [batch, pos, head, d_model]
        self.hook_q_input = HookPoint()  # [batch, pos, head, d_model]
        self.hook_k_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.hook_v_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.ln1 = norm(cfg)
        self.attn = Attention(cfg, layer)
        self.hook_attn_out = HookPoint()
        if not self.parallel:
            self.hook_resid_mid = HookPoint()
        self.hook_mlp_in = HookPoint()  # [batch, pos, d_model]: the stream the MLP reads
        self.ln2 = norm(cfg)
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Mask = CAUSAL,
        kv: KVStore | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if self.parallel:
            resid_pre = self.hook_resid_pre(resid)
            attn_out = self.hook_attn_out(self.read_attention(resid_pre, mask, kv))
            mlp_out = self.hook_mlp_out(self.read_mlp(resid_pre))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        return self.feed(self.attend(resid, mask, kv))

    def attend(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Mask = CAUSAL,
        kv: KVStore | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """resid_pre -> resid_mid: the attention half of a sequential block."""
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.read_attention(resid_pre, mask, kv))
        return self.hook_resid_mid(resid_pre + attn_out)

    def feed(
        self, resid_mid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """resid_mid -> resid_post: the MLP half of a sequential block."""
        mlp_out = self.hook_mlp_out(self.read_mlp(resid_mid))
        return self.hook_resid_post(resid_mid + mlp_out)

    def read_mlp(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The MLP's output on the stream it reads (``hook_mlp_in``, a copy when hooked so
        that an edit there leaves the residual stream alone)."""
        if self.hook_mlp_in.active:
            resid = self.hook_mlp_in(resid.clone())
        return self.mlp(self.ln2(resid))

    def read_attention(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Mask = CAUSAL,
        kv: KVStore | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention's output on the stream it reads. Unhooked, ``attn(ln1(resid))``. With
        ``hook_attn_in`` (each head's copy of the stream) or ``hook_q_input`` /
        ``hook_k_input`` / ``hook_v_input`` (each head's input to one projection) hooked,
        those are built; while no hook changes them the queries, keys and values stay the
        fused kernel's, bit for bit. Once one is changed, every head's q, k and v are
        computed from its own normalised input (``ln1`` without its hooks, per head)."""
        sites = (self.hook_attn_in, self.hook_q_input, self.hook_k_input, self.hook_v_input)
        if not any(s.active for s in sites):
            return self.attn(self.ln1(resid), mask, kv)
        cfg = self.attn.cfg
        group = cfg.n_heads // cfg.kv_heads
        attn_in, changed = self.hook_attn_in.see(
            resid[:, :, None].expand(-1, -1, cfg.n_heads, -1).clone()
        )
        inputs = []
        for site, heads in ((self.hook_q_input, slice(None)), (self.hook_k_input, slice(None, None, group)), (self.hook_v_input, slice(None, None, group))):  # fmt: skip
            x = attn_in[:, :, heads]
            x, edited = site.see(x.clone() if site.active else x)
            inputs.append(x)
            changed |= edited
        # observed only but a backward hook wants the gradient: the values stay the fused
        # kernel's; the gradient reaches each head's input through its own ln1, ln1's hooks
        # through the shared output (a leaf of its own), and the stream once, via attn_in
        grad = not changed and any(s.grad_wanted for s in sites)
        normalized = self.ln1(resid.detach().requires_grad_() if grad else resid)
        fused = affine(normalized, self.attn.W_QKV, self.attn.b_QKV)
        qkv = tuple(self.attn._part(fused, i) for i in range(3))
        if changed or grad:
            weights = ((self.attn.W_Q, self.attn.b_Q), (self.attn.W_K, self.attn.b_K), (self.attn.W_V, self.attn.b_V))  # fmt: skip
            per_head = []
            for x, (W, b) in zip(inputs, weights, strict=True):
                n = self.ln1.plain(x)
                if not changed:  # the shared value, with each head's own gradient to x
                    n = normalized[:, :, None] + (n - n.detach())
                per_head.append(einsum(n, W, "b p h d, h d e -> b p h e") + b)
            qkv = tuple(per_head) if changed else tuple(map(through, qkv, per_head))
        return self.attn(normalized, mask, kv, qkv=qkv)


class KVStore:
    """One layer's keys and values for the positions already run, ``[batch, pos, head,
    d_head]``: ``extend`` returns them with the new positions' appended, and stages the
    result (unless frozen) for ``commit`` to keep or ``discard`` to drop, so that a forward
    that fails part-way changes nothing (see ``resid.core.kv_cache``)."""

    def __init__(self, k: Tensor | None = None, v: Tensor | None = None, frozen: bool = False):
        self.k, self.v, self.frozen = k, v, frozen
        self.staged: tuple[Tensor, Tensor] | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        if not self.frozen:
            self.staged = (k, v)
        return k, v

    def commit(self) -> None:
        """Keep what the last ``extend`` staged."""
        if self.staged is not None:
            (self.k, self.v), self.staged = self.staged, None

    def discard(self) -> None:
        """Drop what the last ``extend`` staged."""
        self.staged = None
