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
        if self.act_fn not in ("gelu_new", "gelu"):
            raise ValueError(
                f"act_fn must be 'gelu_new' (tanh) or 'gelu' (exact), not {self.act_fn!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
