"""GPT-2 in torch, with a hook point at every site of the residual stream.

One convention, stated once: activations are rows and weights multiply on the right,
``x @ W``. So ``W_in: [d_model, d_mlp]`` reads from the residual stream and
``W_out: [d_mlp, d_model]`` writes to it; GPT-2's ``Conv1D`` checkpoints already store
weights this way (``loading`` transposes nanoGPT's ``nn.Linear`` ones).

The forward pass is nanoGPT's, with TransformerLens' hook names:

    hook_embed + hook_pos_embed                      -> blocks.0.hook_resid_pre
    for each block l:
        resid_mid  = resid_pre + attn(ln1(resid_pre))  (blocks.l.hook_attn_out)
        resid_post = resid_mid + mlp(ln2(resid_mid))   (blocks.l.hook_mlp_out)
    logits = ln_final(resid_post) @ W_U                (W_U is W_E transposed: tied)

Nothing is computed that nobody asked for: attention runs through
``scaled_dot_product_attention`` unless a hook or the cache wants the scores or pattern,
per-head results ``[batch, pos, head, d_model]`` exist only when ``attn.hook_result`` is
hooked, and LayerNorm's scale is computed by hand only when ``hook_scale`` is hooked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from resid import hooks
from resid.factored import FactoredMatrix
from resid.head import Head
from resid.hooks import HookFn, HookPoint, NameFilter
from resid.tokenizer import Tokenizer

if TYPE_CHECKING:
    from resid.cache import ActivationCache
    from resid.neuron import Neuron

Input = str | list[str] | Tensor


@dataclass(frozen=True)
class Config:
    """Shapes of a GPT-2. The defaults are GPT-2 small (124M)."""

    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_head: int = 64
    d_mlp: int = 3072
    d_vocab: int = 50257
    n_ctx: int = 1024
    layer_norm_eps: float = 1e-5
    act_fn: Literal["gelu_new", "gelu"] = "gelu_new"  # GPT-2's tanh GELU; nanoGPT's is exact

    def __post_init__(self):
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"n_heads * d_head must equal d_model (GPT-2 concatenates its heads): "
                f"{self.n_heads} * {self.d_head} != {self.d_model}"
            )
        if self.act_fn not in ("gelu_new", "gelu"):
            raise ValueError(
                f"act_fn must be 'gelu_new' (tanh) or 'gelu' (exact), not {self.act_fn!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def affine(
    x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"]
):
    """``x @ W + b`` as one fused GEMM (what GPT-2's ``Conv1D`` does)."""
    out = torch.addmm(b, x.reshape(-1, W.shape[0]), W)
    return out.view(*x.shape[:-1], W.shape[1])


class LayerNorm(nn.Module):
    """``normalized * w + b``, where ``normalized = (x - mean) / scale`` is what
    ``hook_normalized`` sees (TransformerLens' meaning: before the gain and bias)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.hook_scale.active:  # the scale is wanted on its own: compute it by hand, in fp32
            centred = x.float() - x.float().mean(-1, keepdim=True)
            scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            normalized = self.hook_normalized((centred / scale).to(x.dtype))
        elif self.hook_normalized.active:
            normalized = self.hook_normalized(F.layer_norm(x, self.w.shape, eps=self.eps))
        else:  # fast path: one fused kernel
            return self.plain(x)
        return normalized * self.w + self.b

    def plain(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """This LayerNorm with no hook points, on ``x``'s device and in its dtype: for code
        that recomputes a piece of the forward pass (patching sweeps, neurons) silently."""
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
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = (
            HookPoint()
        )  # [batch, head, query_pos, key_pos], -inf above the diagonal
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], only when hooked

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

    @property
    def wants_pattern(self) -> bool:
        return self.hook_attn_scores.active or self.hook_pattern.active

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        batch, pos, _ = x.shape
        h, e = self.cfg.n_heads, self.cfg.d_head
        qkv = affine(x, self.W_QKV, self.b_QKV).view(batch, pos, 3, h, e)
        q, k, v = qkv.unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.wants_pattern:
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(e)
            causal = torch.ones(pos, pos, dtype=torch.bool, device=x.device).triu(1)
            scores = self.hook_attn_scores(scores.masked_fill(causal, float("-inf")))
            pattern = self.hook_pattern(scores.float().softmax(-1).to(v.dtype))
            z = (pattern @ vh).transpose(1, 2)
        else:  # fast path: the pattern is never materialised
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            z = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
        z = self.hook_z(z)
        if self.hook_result.active:
            result = self.hook_result(einsum(z, self.W_O, "b p h e, h e d -> b p h d"))
            return result.sum(2) + self.b_O
        return affine(z.reshape(batch, pos, h * e), self.W_O.view(h * e, -1), self.b_O)


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

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(affine(x, self.W_in, self.b_in))
        post = self.hook_post(F.gelu(pre, approximate=self.approximate))
        return affine(post, self.W_out, self.b_out)


class Block(nn.Module):
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
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


def _stacked(module: str, name: str, shape: str) -> property:
    """A ``Model`` property: every block's ``module.name``, stacked on a leading layer axis."""

    def get(self: Model) -> Tensor:
        return torch.stack([getattr(getattr(block, module), name) for block in self.blocks])

    return property(get, doc=f"``[{shape}]``: each block's ``{module}.{name}``, stacked (a copy).")


class Model(nn.Module):
    """A GPT-2 with hook points at every site.

    >>> model = resid.load("gpt2")
    >>> logits = model("The Eiffel Tower is in")   # [1, 7, 50257]: one row per prefix
    >>> logits, cache = model.run_with_cache("Hello", names_filter=lambda n: "resid" in n)
    """

    def __init__(self, cfg: Config | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg = cfg = cfg or Config()
        self._tokenizer = tokenizer
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg)
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        if self.W_E.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2's initialisation: normal(0, std) matrices, zero biases, unit LayerNorm gains."""
        for name, p in self.named_parameters():
            if name.endswith(("W_E", "W_pos", "W_QKV", "W_O", "W_in", "W_out")):
                nn.init.normal_(p, std=std)
            elif name.endswith(".w"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding: GPT-2 ties it to the embedding, so it is a view of ``W_E``."""
        return self.W_E.T

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    # ---- heads, and every layer's weights stacked (TransformerLens' names) ------------

    def head(self, layer: int, index: int) -> Head:
        """Attention head ``index`` of block ``layer``: weights, QK/OV circuits, pattern."""
        return Head(self, layer, index)

    W_Q = _stacked("attn", "W_Q", "layer head d_model d_head")
    W_K = _stacked("attn", "W_K", "layer head d_model d_head")
    W_V = _stacked("attn", "W_V", "layer head d_model d_head")
    W_O = _stacked("attn", "W_O", "layer head d_head d_model")
    b_Q = _stacked("attn", "b_Q", "layer head d_head")
    b_K = _stacked("attn", "b_K", "layer head d_head")
    b_V = _stacked("attn", "b_V", "layer head d_head")
    b_O = _stacked("attn", "b_O", "layer d_model")
    W_in = _stacked("mlp", "W_in", "layer d_model d_mlp")
    W_out = _stacked("mlp", "W_out", "layer d_mlp d_model")
    b_in = _stacked("mlp", "b_in", "layer d_mlp")
    b_out = _stacked("mlp", "b_out", "layer d_model")

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's ``W_Q W_Kᵀ``, factored: ``[layer, head, d_model, d_model]``."""
        return FactoredMatrix(self.W_Q, self.W_K.mT)

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's ``W_V W_O``, factored: ``[layer, head, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    # ---- the forward pass ------------------------------------------------------------

    def forward(
        self,
        input: Input,
        return_type: Literal["logits", "loss"] | None = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Tensor | None:
        """Logits for every prefix of the input: row ``i`` predicts token ``i + 1``.

        ``input`` is a string, a list of strings (right-padded, BOS prepended), or token ids
        ``[batch, pos]`` / ``[pos]``. ``return_type="loss"`` gives the mean next-token loss.

        As in TransformerLens, ``start_at_layer=l`` takes ``input`` to be the residual stream
        entering block ``l`` (``[batch, pos, d_model]``), and ``stop_at_layer=l`` returns the
        residual stream entering block ``l`` instead of logits.
        """
        if start_at_layer is None:
            tokens = self.tokens(input)
            resid = self.embed(tokens)
        elif return_type == "loss":
            raise ValueError("return_type='loss' needs tokens, so it cannot start at a layer")
        else:
            resid = input
        for block in self.blocks[start_at_layer:stop_at_layer]:
            resid = block(resid)
        if stop_at_layer is not None:
            return resid
        if return_type is None:
            return None
        logits = self.ln_final(resid) @ self.W_U
        if return_type == "logits":
            return logits
        if return_type == "loss":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        raise ValueError(f"return_type must be 'logits', 'loss' or None, not {return_type!r}")

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream's first state: token embedding plus position embedding."""
        batch, pos = tokens.shape
        embed = self.hook_embed(self.W_E[tokens])
        pos_embed = self.W_pos[:pos].expand(batch, pos, -1)
        if self.hook_pos_embed.active:  # hooks get a tensor of their own, never the weights
            pos_embed = self.hook_pos_embed(pos_embed.clone())
        return embed + pos_embed

    # ---- hooks and caching ---------------------------------------------------------

    @contextmanager
    def hooks(self, fwd_hooks: list[tuple[str | NameFilter, HookFn]] = ()) -> Iterator[Model]:
        """Attach ``(name_or_filter, fn)`` hooks for the length of a ``with`` block.

        >>> steer = lambda resid, hook: resid + 4 * direction
        >>> with model.hooks([("blocks.6.hook_resid_pre", steer)]):
        ...     logits = model("I think that")
        """
        with hooks.attached(self.hook_dict, fwd_hooks):
            yield self

    def run_with_hooks(
        self,
        input: Input,
        fwd_hooks: list[tuple[str | NameFilter, HookFn]] = (),
        **forward_kwargs,
    ):
        """One forward with hooks attached; they are removed afterwards, even on error."""
        with self.hooks(fwd_hooks):
            return self(input, **forward_kwargs)

    def run_with_cache(
        self,
        input: Input,
        names_filter: str | list[str] | NameFilter | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **forward_kwargs,
    ) -> tuple[Tensor, ActivationCache]:
        """Forward, keeping the activations at the sites ``names_filter`` picks.

        ``None`` caches every site except the per-head ``attn.hook_result`` (name it, or
        pass a filter, to get it). Only what is cached is computed: leave the patterns out
        and attention keeps its fast path. ``device`` and ``dtype`` say where and how the
        cache keeps its tensors (e.g. ``device="cpu"`` to keep GPU memory free).
        """
        from resid.cache import ActivationCache

        if names_filter is None:
            names_filter = lambda name: not name.endswith("hook_result")  # noqa: E731
        store: dict[str, Tensor] = {}

        def save(act: Tensor, hook: HookPoint) -> None:
            store[hook.name] = act.detach().to(
                device=device or act.device, dtype=dtype or act.dtype
            )

        selected = hooks.resolve(self.hook_dict, names_filter)
        with self.hooks([(hp.name, save) for hp in selected]):
            out = self(input, **forward_kwargs)
        return out, ActivationCache(store, self)

    # ---- tokens --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.cfg.d_vocab != 50257:
                raise ValueError(
                    f"this model has no tokenizer (d_vocab={self.cfg.d_vocab} is not GPT-2's): "
                    "pass token ids, or give one with Model(cfg, tokenizer=...)"
                )
            self._tokenizer = Tokenizer.gpt2()
        return self._tokenizer

    def to_tokens(
        self, input: str | list[str], prepend_bos: bool = True
    ) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]``, with ``<|endoftext|>`` first as TransformerLens does.

        Several strings are right-padded with ``<|endoftext|>``; attention is causal, so the
        padding never changes the logits of the real tokens before it.
        """
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a non-empty list of strings")
        tok = self.tokenizer
        encoded = [tok.encode(t) for t in texts]
        if not all(encoded):
            raise ValueError("an input string is empty: give at least one token of text")
        rows = [([tok.bos_token_id] if prepend_bos else []) + ids for ids in encoded]
        width = max(map(len, rows))
        rows = [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def tokens(self, input: Input) -> Int[Tensor, "batch pos"]:
        """The input as checked token ids on the model's device (strings get BOS)."""
        if isinstance(input, (str, list)):
            return self.to_tokens(input)
        if not isinstance(input, Tensor):
            raise TypeError(
                f"input must be a string, a list of strings or a tensor of token ids, not {type(input).__name__}"
            )
        if input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a tensor of {input.dtype}")
        tokens = input.unsqueeze(0) if input.dim() == 1 else input
        if tokens.dim() != 2:
            raise ValueError(
                f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}"
            )
        if tokens.numel() == 0:
            raise ValueError(
                f"the input is empty (shape {tuple(input.shape)}): give at least one token"
            )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"{tokens.shape[1]} positions is more than the context of {self.cfg.n_ctx}: "
                f"keep the last {self.cfg.n_ctx} with tokens[:, -{self.cfg.n_ctx}:]"
            )
        lo, hi = (int(t) for t in tokens.aminmax())
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.d_vocab)].unique()[:5].tolist()
            raise ValueError(
                f"token ids {bad} are outside the vocabulary [0, {self.cfg.d_vocab}): "
                "were they made by another tokenizer?"
            )
        return tokens.to(self.device, torch.long)

    def to_str_tokens(self, input: str | Tensor | list[int], prepend_bos: bool = True) -> list[str]:
        """One string per token of a single sequence."""
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)
        ids = torch.as_tensor(input).flatten().tolist() if not isinstance(input, list) else input
        if isinstance(input, Tensor) and input.dim() == 2 and input.shape[0] != 1:
            raise ValueError("to_str_tokens takes one sequence; index the batch first")
        return self.tokenizer.decode_each(ids)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode ids: ``[pos]`` gives a string, ``[batch, pos]`` a list of strings."""
        t = torch.as_tensor(tokens)
        if t.dim() == 2:
            return [self.tokenizer.decode(row) for row in t.tolist()]
        return self.tokenizer.decode(t.flatten().tolist())

    def to_single_token(self, text: str) -> int:
        """The id of a string that is exactly one token, e.g. ``" Paris"``."""
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(
                f"{text!r} is {len(ids)} tokens, not one: {self.tokenizer.decode_each(ids)}"
            )
        return ids[0]

    # ---- generation ------------------------------------------------------------------

    def generate(self, input: Input, max_new_tokens: int = 20, **kwargs) -> str | Tensor:
        """Continue the input; see ``resid.generation.generate``."""
        from resid.generation import generate

        return generate(self, input, max_new_tokens, **kwargs)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"Model(n_layers={c.n_layers}, n_heads={c.n_heads}, d_model={c.d_model}, "
            f"d_mlp={c.d_mlp}, d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, dtype={self.dtype}, device={self.device})"
        )

    # ---- neurons ---------------------------------------------------------------------

    def neuron(self, layer: int, index: int) -> Neuron:
        """MLP neuron ``index`` of ``layer``: ``.read``, ``.write``, ``.bias``,
        ``.activation(...)``, ``.logit_effect()``; see ``resid.neuron``."""
        from resid.neuron import Neuron

        return Neuron(self, layer, index)
