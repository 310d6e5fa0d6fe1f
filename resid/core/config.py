"""The shapes and choices that make a model: ``Config``.

>>> Config(n_layers=2, n_heads=4, d_model=256, d_head=64, d_mlp=1024)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Config:
    """The shapes of a model and the choice made for each architectural piece. The defaults
    are GPT-2 small (124M); GPT-Neo, Pythia (GPT-NeoX), Llama, Mistral and Qwen2 differ in
    the fields below ``act_fn`` (see ``resid.io.families``)."""

    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_head: int = 64
    d_mlp: int = 3072
    d_vocab: int = 50257
    n_ctx: int = 1024
    layer_norm_eps: float = 1e-5
    act_fn: Literal["gelu_new", "gelu", "silu", "relu"] = "gelu_new"  # GPT-2's tanh GELU
    # ---- the architectural choices; the defaults are GPT-2's ----
    # LayerNorm, RMSNorm (Llama), or either with its gain folded away (resid.process_weights)
    normalization: Literal["LN", "RMS", "LNPre", "RMSPre"] = "LN"
    positional: Literal["learned", "rotary"] = "learned"
    rotary_dim: int | None = None  # rotated dims of each head (None: all; Pythia: 25 %)
    rotary_base: float = 10000.0  # θ
    rotary_scaling: tuple[float, float, float, int] | None = None  # Llama 3: factor, low, high, ctx
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads)
    attn_bias: bool = True  # biases on q, k, v
    attn_out_bias: bool = True  # bias on the output projection
    attn_scale: float | None = None  # None: 1/sqrt(d_head); GPT-Neo: 1.0 (unscaled)
    attn_windows: tuple[int | None, ...] | None = None  # per layer: a local window, or None
    gated_mlp: bool = False  # SwiGLU: act(x W_gate) * (x W_in), then W_out
    mlp_bias: bool = True
    parallel_attn_mlp: bool = False  # GPT-NeoX/Pythia: attn and MLP both read resid_pre
    tie_embeddings: bool = True  # W_U = W_E.T
    unembed_bias: bool = False
    architecture: str = "gpt2"  # the family it was loaded as (informational)
    # the weight processing applied (resid.process_weights), in order; () for exact weights
    processing: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(
                    f"Config.{name} must be a positive integer, not {value!r} "
                    f"({type(value).__name__})"
                )
        eps = self.layer_norm_eps
        if (
            isinstance(eps, bool)
            or not isinstance(eps, numbers.Real)
            or not math.isfinite(eps)
            or eps <= 0
        ):
            raise ValueError(
                f"Config.layer_norm_eps must be a positive finite number, not {eps!r}: "
                "LayerNorm divides by sqrt(variance + eps)"
            )
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"n_heads * d_head must equal d_model (GPT-2 concatenates its heads): "
                f"{self.n_heads} * {self.d_head} != {self.d_model}"
            )
        if self.act_fn not in ("gelu_new", "gelu", "silu", "relu"):
            raise ValueError(
                f"act_fn must be 'gelu_new' (tanh), 'gelu' (exact), 'silu' or 'relu', "
                f"not {self.act_fn!r}"
            )
        self._check_choices()

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` without grouped-query attention."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def rotary_dims(self) -> int:
        """How many of each head's dimensions rotary embeddings rotate (0: none)."""
        if self.positional != "rotary":
            return 0
        return self.d_head if self.rotary_dim is None else self.rotary_dim

    def _check_choices(self) -> None:
        if self.normalization not in ("LN", "RMS", "LNPre", "RMSPre"):
            raise ValueError(
                "normalization must be 'LN', 'RMS', 'LNPre' or 'RMSPre' (the last two: no "
                f"gain or bias, as resid.process_weights leaves them), not {self.normalization!r}"
            )
        steps = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                 "refactor_factored_attn_matrices")  # fmt: skip
        if not isinstance(self.processing, tuple) or not set(self.processing) <= set(steps):
            raise ValueError(
                f"processing lists steps of resid.process_weights {steps}, not {self.processing!r}"
            )
        if self.positional not in ("learned", "rotary"):
            raise ValueError(f"positional must be 'learned' or 'rotary', not {self.positional!r}")
        if self.positional == "rotary":
            r = self.rotary_dims
            if (
                isinstance(r, bool)
                or not isinstance(r, numbers.Integral)
                or not 0 < r <= self.d_head
                or r % 2
            ):
                raise ValueError(
                    f"rotary_dim must be an even integer in (0, d_head={self.d_head}], not {r!r}"
                )
            base = self.rotary_base
            if (
                isinstance(base, bool)
                or not isinstance(base, numbers.Real)
                or not math.isfinite(base)
                or base <= 1
            ):
                raise ValueError(f"rotary_base (θ) must be a finite number > 1, not {base!r}")
            if self.rotary_scaling is not None:
                if len(self.rotary_scaling) != 4 or not all(
                    isinstance(v, numbers.Real) and math.isfinite(v) and v > 0
                    for v in self.rotary_scaling
                ):
                    raise ValueError(
                        "rotary_scaling is Llama 3's (factor, low_freq_factor, high_freq_factor, "
                        f"original_max_position_embeddings), all positive, not {self.rotary_scaling!r}"
                    )
        kv = self.kv_heads
        if (
            isinstance(kv, bool)
            or not isinstance(kv, numbers.Integral)
            or kv < 1
            or self.n_heads % kv
        ):
            raise ValueError(
                f"n_kv_heads must be a positive divisor of n_heads={self.n_heads} (each key/value "
                f"head serves n_heads / n_kv_heads query heads), not {kv!r}"
            )
        if self.attn_scale is not None and not (
            isinstance(self.attn_scale, numbers.Real)
            and math.isfinite(self.attn_scale)
            and self.attn_scale > 0
        ):
            raise ValueError(
                f"attn_scale must be a positive finite number, not {self.attn_scale!r}"
            )
        if self.attn_windows is not None:
            if len(self.attn_windows) != self.n_layers or not all(
                w is None or (isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0)
                for w in self.attn_windows
            ):
                raise ValueError(
                    f"attn_windows gives each of the {self.n_layers} layers a positive window or "
                    f"None (global), not {self.attn_windows!r}"
                )

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s local attention window, or None for global attention."""
        return None if self.attn_windows is None else self.attn_windows[layer]

    def to_dict(self) -> dict:
        return asdict(self)
