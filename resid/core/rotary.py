"""Rotary position embeddings: each head's query and key are rotated by an angle that grows
with their position, so ``q_i · k_j`` depends on ``i - j`` only.

The first ``rotary_dims`` dimensions of a head are rotated in two halves (GPT-NeoX's and
Llama's ``rotate_half`` layout): dimension ``t`` pairs with ``t + rotary_dims / 2`` at
frequency ``θ^(-2t / rotary_dims)``; the remaining dimensions pass unchanged (Pythia
rotates a quarter of each head). Llama 3's frequency scaling is applied when configured.

>>> rot = Rotary(cfg)
>>> cos, sin = rot.angles(torch.arange(5))         # [5, rotary_dims], fp32
>>> q_rotated = rot(q, cos, sin)                    # q: [batch, pos, head, d_head]
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from resid.core.config import Config


def inverse_frequencies(cfg: Config) -> Float[Tensor, " half"]:
    """``θ^(-2t / rotary_dims)`` for ``t < rotary_dims / 2``, with Llama 3's scaling."""
    dims = cfg.rotary_dims
    steps = torch.arange(0, dims, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (cfg.rotary_base ** (steps / dims))
    if cfg.rotary_scaling is None:
        return inv
    factor, low, high, old_ctx = cfg.rotary_scaling
    wavelength = 2 * math.pi / inv
    low_wavelength, high_wavelength = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelength > low_wavelength, inv / factor, inv)
    smooth = (old_ctx / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotates the first ``cfg.rotary_dims`` dimensions of each head by position."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dims = cfg.rotary_dims
        self.cfg = cfg
        self._inv: dict[torch.device, Tensor] = {}  # not a buffer: fp32, whatever the model's dtype

    def inv_freq(self, device: torch.device) -> Float[Tensor, " half"]:
        if device not in self._inv:
            self._inv[device] = inverse_frequencies(self.cfg).to(device)
        return self._inv[device]

    def angles(
        self, positions: Int[Tensor, "*batch pos"]
    ) -> tuple[Float[Tensor, "*batch pos rot"], Float[Tensor, "*batch pos rot"]]:
        """``cos`` and ``sin`` of every rotated dimension's angle at ``positions`` (fp32)."""
        freqs = positions.float()[..., None] * self.inv_freq(positions.device)
        angle = torch.cat([freqs, freqs], -1)
        return angle.cos(), angle.sin()

    def forward(
        self,
        x: Float[Tensor, "batch pos head d_head"],
        cos: Float[Tensor, "*batch pos rot"],
        sin: Float[Tensor, "*batch pos rot"],
    ) -> Float[Tensor, "batch pos head d_head"]:
        cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)
        if cos.dim() == 3:  # positions shared by the batch: [pos, 1, rot]
            cos, sin = cos[None], sin[None]
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        first, second = rot.chunk(2, -1)
        turned = torch.cat([-second, first], -1)
        rotated = rot * cos + turned * sin
        return rotated if rest.shape[-1] == 0 else torch.cat([rotated, rest], -1)

    def matrix(self, offset: int, d_head: int) -> Float[Tensor, "d_head d_head"]:
        """``R`` with ``rotate(x at i) · rotate(y at j) = x R yᵀ`` for ``i - j = offset``:
        the rotation by ``offset`` positions, as a matrix acting on rows (``x @ R``)."""
        cos, sin = self.angles(torch.tensor([offset]))
        eye = torch.eye(d_head)
        # rows of R are the rotated basis vectors: rotate each e_t as a query at `offset`
        basis = eye[None, :, None, :]  # [1, d_head (as pos), 1 (head), d_head]
        rotated = self(basis, cos.expand(d_head, -1), sin.expand(d_head, -1))
        return rotated[0, :, 0, :]
