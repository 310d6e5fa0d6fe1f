"""What every family shares: the checked config readers, the one list of non-weight
buffers, and the description of a family's weights (``Family``, ``Param``, ``Piece``).

A family declares, for each of resid's parameters, the checkpoint tensors it is made of
(``Piece``: a name, the shape the checkpoint stores, and how it is written into resid's
``x @ W`` layout). Checking names and shapes, converting and building are done once for
all families, in ``resid.io.convert``.

>>> positive_int({"n_head": 12}, "n_head", "config.json")
12
>>> Param((4, 3), (Piece("fc.weight", (3, 4), transposed),))   # nn.Linear's [out, in]
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from resid.core.config import Config
from resid.io.errors import CheckpointError

MAX_LAYERS = 4096  # with no weights to compare against: far more than any model has
# Buffers some checkpoints carry that are not weights: GPT-2's and GPT-Neo's causal masks,
# GPT-NeoX's masks, rotary frequency tables. Matched as whole name components.
NON_WEIGHTS = re.compile(r"(^|\.)(attn|attention)\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new",
               "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}  # fmt: skip


# ---- checked config values ---------------------------------------------------------------


def positive_int(d: dict, key: str, where: str, default: int | None = None) -> int:
    """``d[key]`` (or ``default``), which must be a positive integer (not a bool, a float or
    a string)."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        got = "missing" if key not in d and default is None else f"{value!r}"
        raise CheckpointError(
            f"{where}: '{key}' must be a positive integer, not {got} ({type(value).__name__})"
        )
    return int(value)


def positive_float(d: dict, key: str, where: str, default: float) -> float:
    """``d[key]`` (or ``default``), which must be a positive finite number."""
    value = d.get(key, default)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value > 0):
        raise CheckpointError(f"{where}: '{key}' must be a positive finite number, not {value!r}")
    return float(value)


def flag(d: dict, key: str, where: str, default: bool) -> bool:
    """``d[key]`` (or ``default`` when absent or null), which must be true or false."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: '{key}' must be true or false, not {value!r}")
    return value


def layers(d: dict, key: str, where: str, held: int | None, default: int | None = None) -> int:
    """The number of blocks, compared with the blocks the weights hold (``held``) before
    anything is sized from it: a config asking for 10⁹ layers costs nothing. (Weights that
    hold no block of this family, ``held`` 0, are left to the key check to list.)"""
    n = positive_int(d, key, where, default)
    if held and n > held:
        raise CheckpointError(
            f"{where} asks for {n:,} blocks but the weights hold {held}: fix '{key}' in the config"
        )
    if n > MAX_LAYERS:
        raise CheckpointError(
            f"{where}: '{key}' is {n:,}; resid reads at most {MAX_LAYERS:,} blocks"
        )
    return n


def activation(d: dict, key: str, where: str, default: str) -> str:
    """resid's name for the config's activation function."""
    act = d.get(key, default)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise CheckpointError(
            f"{where}: activation {act!r} is not one resid has ({', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[act]


def head_width(d_model: int, n_heads: int, where: str) -> int:
    """``d_model // n_heads``, which must divide evenly."""
    if d_model % n_heads:
        raise CheckpointError(
            f"{where}: the width {d_model} is not a multiple of the {n_heads} heads: the "
            "residual stream is split evenly across the heads"
        )
    return d_model // n_heads


def rope(hf: dict, where: str, d_head: int, default_theta: float = 10000.0) -> dict:
    """``rotary_dim``, ``rotary_base`` (θ) and ``rotary_scaling`` (Llama 3) from old
    (``rope_theta``, ``rope_scaling``, ``rotary_pct``) or new (``rope_parameters``) keys."""
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: rope_parameters / rope_scaling must be objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
    fraction = merged.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not 0 < fraction <= 1
    ):
        raise CheckpointError(f"{where}: the rotary fraction must be in (0, 1], not {fraction!r}")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(
            f"{where}: rotary scaling {kind!r} is not supported (resid has none and 'llama3')"
        )
    out = {
        "rotary_dim": int(d_head * fraction),
        "rotary_base": positive_float({"rope_theta": theta}, "rope_theta", where, default_theta),
    }
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in merged for k in keys):
            raise CheckpointError(f"{where}: llama3 rotary scaling needs {', '.join(keys)}")
        out["rotary_scaling"] = (
            *(positive_float(merged, k, where, 1.0) for k in keys[:3]),
            positive_int(merged, keys[3], where),
        )
    return out


def make_config(where: str, **fields) -> Config:
    """``Config(**fields)``, its own checks raised as ``CheckpointError``."""
    try:
        return Config(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


# ---- a family's weights ------------------------------------------------------------------


def copied(out: Tensor, src: Tensor) -> None:
    """The checkpoint stores it as resid does (``x @ W``; a vector); ``out`` may be a
    per-head reshape of the same numbers."""
    out.view(src.shape).copy_(src)


def transposed(out: Tensor, src: Tensor) -> None:
    """An ``nn.Linear`` weight ``[out, in]``, written as resid's ``[in, out]``."""
    out.view(src.shape[::-1]).copy_(src.T)


def columns(start: int, stop: int, transpose: bool = True) -> Callable[[Tensor, Tensor], None]:
    """Write into columns ``start:stop`` of a fused matrix (q, k, v side by side), or into
    those entries of a fused bias."""

    def write(out: Tensor, src: Tensor) -> None:
        if out.dim() == 1:
            out[start:stop].copy_(src)
        else:
            out[:, start:stop].copy_(src.T if transpose else src)

    return write


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor: its name (base-model prefix removed), the shape it is stored
    with, and how it is written into resid's parameter."""

    key: str
    shape: tuple[int, ...]
    write: Callable[[Tensor, Tensor], None] = copied


@dataclass(frozen=True)
class Param:
    """One of resid's parameters: its shape and the pieces it is made of (none: zeros, a
    bias the family does not have). ``stored_transposed``: kept as the transpose of a
    contiguous ``[out, in]`` matrix, as ``nn.Linear`` stores it, so that it is read with
    one straight copy; resid's ``x @ W`` reads it as it reads any matrix (a
    transposed operand costs a matrix product nothing)."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...] = ()
    stored_transposed: bool = False

    def empty(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """Uninitialised storage for it, in its layout."""
        if not self.stored_transposed:
            return torch.empty(self.shape, dtype=dtype, device=device)
        rows = math.prod(self.shape[:-1])
        return torch.empty(self.shape[-1], rows, dtype=dtype, device=device).T.view(self.shape)


def linear(shape_in_out: tuple[int, int], key: str) -> Param:
    """A parameter stored by ``nn.Linear`` as ``[out, in]``."""
    d_in, d_out = shape_in_out
    return Param((d_in, d_out), (Piece(key, (d_out, d_in), transposed),), stored_transposed=True)


def vector(n: int, key: str | None) -> Param:
    """A bias or a norm's gain; ``key=None``: zeros."""
    return Param((n,), (Piece(key, (n,)),) if key else ())


def separate_qkv(cfg: Config, keys: tuple[str, str, str], biases: tuple[str, str, str] | None):
    """``W_QKV`` and ``b_QKV`` from separate ``nn.Linear`` q, k, v projections."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.kv_heads * cfg.d_head
    bounds = ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
    W = Param((d, q + 2 * kv), tuple(
        Piece(k, (b - a, d), columns(a, b)) for k, (a, b) in zip(keys, bounds, strict=True)),
        stored_transposed=True)  # fmt: skip
    if biases is None:
        return W, Param((q + 2 * kv,))
    b = Param((q + 2 * kv,), tuple(
        Piece(k, (hi - lo,), columns(lo, hi)) for k, (lo, hi) in zip(biases, bounds, strict=True)))  # fmt: skip
    return W, b


@dataclass(frozen=True)
class Family:
    """A checkpoint architecture resid reads: how its config becomes a ``Config`` and its
    tensors resid's parameters.

    ``config(hf, where, held)`` reads the config (``held``: the blocks the weights hold,
    compared before anything is sized); ``params(cfg)`` maps each resid parameter to its
    pieces; ``embed`` is the embedding's key and ``tied`` the key of an unembedding that,
    when present in a tied model, must equal it; ``renamed``: other names ``transformers``
    gives a key in memory (GPT-NeoX's ``lm_head.weight`` is ``embed_out.weight`` on disk)."""

    model_type: str
    architecture: str
    prefixes: tuple[str, ...]
    block: str  # blocks' keys start f"{block}.{i}."
    config: Callable[[dict, str, int | None], Config]
    params: Callable[[Config], dict[str, Param]]
    embed: str
    tied: str | None = "lm_head.weight"
    renamed: tuple[tuple[str, str], ...] = ()  # (another name a key goes by, the name used)

    def held(self, keys) -> int:
        """How many blocks the weights hold (one past the highest block index)."""
        pattern = re.compile(rf"{re.escape(self.block)}\.(\d+)\.")
        indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
        return max(indices) + 1 if indices else 0


def outer_params(cfg: Config, embed: str, final: tuple[str, str | None], lm_head: str | None,
                 pos: str | None = None) -> dict[str, Param]:  # fmt: skip
    """The parameters outside the blocks: embedding, positions, final norm, unembedding."""
    d, V = cfg.d_model, cfg.d_vocab
    out = {"W_E": Param((V, d), (Piece(embed, (V, d)),)), "ln_final.w": vector(d, final[0])}
    if pos is not None and cfg.positional == "learned":
        out["W_pos"] = Param((cfg.n_ctx, d), (Piece(pos, (cfg.n_ctx, d)),))
    if cfg.normalization == "LN":
        out["ln_final.b"] = vector(d, final[1])
    if not cfg.tie_embeddings and lm_head is not None:
        out["lm_head"] = linear((d, V), lm_head)
    return out


def norm_params(cfg: Config, prefix: str, ln1: tuple[str, str], ln2: tuple[str, str]):
    """A block's two norms: gains, and biases where they are LayerNorms."""
    out = {}
    for name, (w, b) in (("ln1", ln1), ("ln2", ln2)):
        out[f"{prefix}{name}.w"] = vector(cfg.d_model, w)
        if cfg.normalization == "LN":
            out[f"{prefix}{name}.b"] = vector(cfg.d_model, b)
    return out


def mlp_params(cfg: Config, prefix: str, up: tuple[str, str | None],
               down: tuple[str, str | None], gate: tuple[str, str | None] | None = None):  # fmt: skip
    """A block's MLP from ``nn.Linear`` weights (``(weight, bias or None)`` keys)."""
    d, m = cfg.d_model, cfg.d_mlp
    out = {f"{prefix}mlp.W_in": linear((d, m), up[0]), f"{prefix}mlp.b_in": vector(m, up[1]),
           f"{prefix}mlp.W_out": linear((m, d), down[0]), f"{prefix}mlp.b_out": vector(d, down[1])}  # fmt: skip
    if gate is not None:
        out[f"{prefix}mlp.W_gate"] = linear((d, m), gate[0])
        out[f"{prefix}mlp.b_gate"] = vector(m, gate[1])
    return out


def out_params(cfg: Config, prefix: str, weight: str, bias: str | None) -> dict[str, Param]:
    """A block's attention output from an ``nn.Linear`` ``[d_model, heads · d_head]``."""
    h, e, d = cfg.n_heads, cfg.d_head, cfg.d_model
    W = Param((h, e, d), (Piece(weight, (d, h * e), transposed),), stored_transposed=True)
    return {f"{prefix}attn.W_O": W, f"{prefix}attn.b_O": vector(d, bias)}
