"""A transformer's building blocks as plain functions: no hooks, no modules, no state.

They are the textbook formulas, for working examples by hand, notebooks and tests. The
``Model`` computes the same things with hook points in between (its tests check it against
these). Right multiplication throughout, as in ``resid.core.model``: ``x @ W``.

>>> E = torch.tensor([[1, 3, 3, 5], [2.84, 3.99, 4, 6]])
>>> attention(E, W_Q, W_K, W_V, scale=1 / 30, causal=False)   # one head, seed 003's numbers
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

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
    concatenated = rearrange(z, "head ... pos d_head -> ... pos (head d_head)")
    return concatenated @ rearrange(W_O, "head d_head d_model -> (head d_head) d_model")


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
