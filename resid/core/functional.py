"""A transformer's building blocks as plain functions: no hooks, no modules, no state.

They are the textbook formulas, for working examples by hand, notebooks and tests. The
``Model`` computes the same things with hook points in between (its tests check it against
these). Right multiplication throughout, as in ``resid.core.model``: ``x @ W``.

Beside GPT-2's decoder-only pieces are those of the original encoder-decoder transformer
(Vaswani et al. 2017): sinusoidal positions, cross-attention (queries from one sequence,
keys and values from another) and a post-norm decoder block.

>>> E = torch.tensor([[1, 3, 3, 5], [2.84, 3.99, 4, 6]])
>>> attention(E, W_Q, W_K, W_V, scale=1 / 30, causal=False)   # one head, seed 003's numbers
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor


def attention_pattern(
    q: Float[Tensor, "... q_pos d_head"],
    k: Float[Tensor, "... k_pos d_head"],
    scale: float | None = None,
    causal: bool = True,
) -> Float[Tensor, "... q_pos k_pos"]:
    """softmax(q kᵀ · scale), where scale defaults to 1/√d_head; causal masks k > q."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1)


def attention(
    x: Float[Tensor, "... pos d_model"],
    W_Q: Float[Tensor, "d_model d_head"],
    W_K: Float[Tensor, "d_model d_head"],
    W_V: Float[Tensor, "d_model d_head"],
    scale: float | None = None,
    causal: bool = True,
) -> Float[Tensor, "... pos d_head"]:
    """One head: softmax(Q Kᵀ · scale) V with Q = x W_Q, K = x W_K, V = x W_V."""
    return attention_pattern(x @ W_Q, x @ W_K, scale, causal) @ (x @ W_V)


def cross_attention(
    x: Float[Tensor, "... pos d_model"],
    memory: Float[Tensor, "... mem_pos d_model"],
    W_Q: Float[Tensor, "d_model d_head"],
    W_K: Float[Tensor, "d_model d_head"],
    W_V: Float[Tensor, "d_model d_head"],
    scale: float | None = None,
) -> Float[Tensor, "... pos d_head"]:
    """One encoder-decoder head: queries from ``x`` (the decoder's stream), keys and values
    from ``memory`` (the encoder's output), so each output row is a mixture of memory rows:
    softmax(x W_Q (memory W_K)ᵀ · scale) memory W_V. Every query sees every memory position.

    >>> cross_attention(decoder_states, encoder_output, W_Q, W_K, W_V).shape  # [pos, d_head]
    """
    return attention_pattern(x @ W_Q, memory @ W_K, scale, causal=False) @ (memory @ W_V)


def _concat_heads(
    z: Float[Tensor, "head ... pos d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "... pos d_model"]:
    concatenated = rearrange(z, "head ... pos d_head -> ... pos (head d_head)")
    return concatenated @ rearrange(W_O, "head d_head d_model -> (head d_head) d_model")


def multi_head_attention(
    x: Float[Tensor, "... pos d_model"],
    W_Q: Float[Tensor, "head d_model d_head"],
    W_K: Float[Tensor, "head d_model d_head"],
    W_V: Float[Tensor, "head d_model d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    scale: float | None = None,
    causal: bool = True,
) -> Float[Tensor, "... pos d_model"]:
    """Every head's output, concatenated along d_head, times the output projection."""
    z = torch.stack(
        [attention(x, q, k, v, scale, causal) for q, k, v in zip(W_Q, W_K, W_V, strict=True)]
    )
    return _concat_heads(z, W_O)


def multi_head_cross_attention(
    x: Float[Tensor, "... pos d_model"],
    memory: Float[Tensor, "... mem_pos d_model"],
    W_Q: Float[Tensor, "head d_model d_head"],
    W_K: Float[Tensor, "head d_model d_head"],
    W_V: Float[Tensor, "head d_model d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    scale: float | None = None,
) -> Float[Tensor, "... pos d_model"]:
    """Every cross-attention head's output (:func:`cross_attention`), concatenated along
    d_head, times the output projection: one row per row of ``x``, whatever ``memory``'s
    length.

    >>> multi_head_cross_attention(x, encoder_output, W_Q, W_K, W_V, W_O).shape  # x.shape
    """
    z = torch.stack(
        [cross_attention(x, memory, q, k, v, scale) for q, k, v in zip(W_Q, W_K, W_V, strict=True)]
    )
    return _concat_heads(z, W_O)


def head_outputs(
    z: Float[Tensor, "... pos head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "... pos head d_model"]:
    """What each head writes to the residual stream (their sum plus b_O is the layer's output)."""
    return einsum(z, W_O, "... pos head d_head, head d_head d_model -> ... pos head d_model")


def layer_norm(
    x: Float[Tensor, "... d_model"],
    eps: float = 1e-5,
    w: Float[Tensor, " d_model"] | None = None,
    b: Float[Tensor, " d_model"] | None = None,
    eps_added_to: Literal["variance", "std"] = "variance",
) -> Float[Tensor, "... d_model"]:
    """(x - mean) / scale · w + b, with the population variance.

    GPT-2 (and ``torch.nn.LayerNorm``) use scale = √(var + eps); some textbook code uses
    scale = std + eps, which ``eps_added_to="std"`` gives."""
    centred = x - x.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1, keepdim=True)
    scale = (var + eps).sqrt() if eps_added_to == "variance" else var.sqrt() + eps
    out = centred / scale
    return out * (1 if w is None else w) + (0 if b is None else b)


def sinusoidal_positions(
    n_pos: int, d_model: int, base: float = 10000.0
) -> Float[Tensor, "n_pos d_model"]:
    """The original transformer's fixed positional encoding (Vaswani et al. 2017, §3.5):
    PE[pos, 2i] = sin(pos / base^(2i/d_model)), PE[pos, 2i+1] = cos(pos / base^(2i/d_model)),
    so dimensions 2i and 2i+1 share one frequency. Added to the token embeddings.

    >>> sinusoidal_positions(1, 4)   # position 0: sin 0 = 0, cos 0 = 1
    tensor([[0., 1., 0., 1.]])
    """
    if n_pos < 0 or d_model < 1:
        raise ValueError(f"need n_pos >= 0 and d_model >= 1, got {n_pos} and {d_model}")
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    pair = torch.arange(d_model, dtype=torch.float64) // 2  # i of dimensions 2i and 2i+1
    angle = pos / base ** (2 * pair / d_model)
    even = torch.arange(d_model) % 2 == 0
    return torch.where(even, angle.sin(), angle.cos()).to(torch.get_default_dtype())


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return F.gelu(x, approximate="tanh")


def feed_forward(
    x: Float[Tensor, "... d_model"],
    W_in: Float[Tensor, "d_model d_mlp"],
    b_in: Float[Tensor, " d_mlp"],
    W_out: Float[Tensor, "d_mlp d_model"],
    b_out: Float[Tensor, " d_model"],
    act: Callable[[Tensor], Tensor] = gelu_new,
) -> Float[Tensor, "... d_model"]:
    """act(x W_in + b_in) W_out + b_out: each neuron reads along a column of W_in and writes
    a row of W_out scaled by its activation."""
    return act(x @ W_in + b_in) @ W_out + b_out


class AttentionWeights(NamedTuple):
    """One multi-head attention layer's weights, as :func:`multi_head_attention` takes them."""

    W_Q: Float[Tensor, "head d_model d_head"]
    W_K: Float[Tensor, "head d_model d_head"]
    W_V: Float[Tensor, "head d_model d_head"]
    W_O: Float[Tensor, "head d_head d_model"]


def decoder_block(
    x: Float[Tensor, "... pos d_model"],
    memory: Float[Tensor, "... mem_pos d_model"],
    self_attn: AttentionWeights,
    cross_attn: AttentionWeights,
    W_in: Float[Tensor, "d_model d_mlp"],
    b_in: Float[Tensor, " d_mlp"],
    W_out: Float[Tensor, "d_mlp d_model"],
    b_out: Float[Tensor, " d_model"],
    act: Callable[[Tensor], Tensor] = torch.relu,
    norm: Callable[[Tensor], Tensor] = layer_norm,
    scale: float | None = None,
    causal: bool = True,
) -> Float[Tensor, "... pos d_model"]:
    """The original transformer's decoder block, post-norm (each sub-layer's output is added
    to its input, then normalised):

    z = norm(x + MHA(x)) (masked self-attention: ``causal``), c = norm(z + cross(z, memory))
    (queries from the decoder, keys and values from the encoder's output), out = norm(c +
    FFN(c)). GPT-2's blocks are pre-norm and have no cross-attention: x + MHA(LN(x)).

    >>> w = AttentionWeights(W_Q, W_K, W_V, W_O)
    >>> decoder_block(sos + sinusoidal_positions(1, 4), encoder_output, w, w2, W1, b1, W2, b2)
    """
    z = norm(x + multi_head_attention(x, *self_attn, scale=scale, causal=causal))
    c = norm(z + multi_head_cross_attention(z, memory, *cross_attn, scale=scale))
    return norm(c + feed_forward(c, W_in, b_in, W_out, b_out, act=act))
