"""FactoredMatrix: a low-rank product ``A @ B`` that is never built unless asked for.

A head's QK circuit ``W_Q W_Kᵀ`` is d_model × d_model but has rank d_head; its full OV
circuit ``W_E W_V W_O W_U`` is d_vocab × d_vocab (10 GB for GPT-2) with rank 64. Keeping
the two thin factors ``A: [..., m, r]`` and ``B: [..., r, n]`` makes every question about
the product cheap: SVD, eigenvalues and the Frobenius norm all reduce to r × r matrices.

Leading dimensions broadcast (``[layer, head, m, r]`` stacks a factored matrix per head)
and index like a tensor's. Matrices multiply on the right, as everywhere in resid (see
``resid/model.py``).

>>> M = FactoredMatrix(torch.randn(768, 64), torch.randn(64, 768))
>>> M.shape, M.rank          # (torch.Size([768, 768]), 64)
>>> U, S, V = M.svd()        # M.AB == U @ S.diag() @ V.T, from 64 x 64 work
>>> (x @ M).shape            # x: [10, 768] -> FactoredMatrix [10, 768], still rank 64
>>> (x @ M).AB               # materialise only when asked
"""

from __future__ import annotations

import numbers

import torch
from jaxtyping import Complex, Float
from torch import Tensor


class FactoredMatrix:
    """The matrix ``A @ B`` with ``A: [..., m, r]`` and ``B: [..., r, n]``.

    >>> qk = FactoredMatrix(W_Q, W_K.T)       # [768, 64] @ [64, 768]
    >>> qk.norm(), qk.svd()[1][:5], (qk @ W_E.T).shape
    """

    def __init__(self, A: Float[Tensor, "... m r"], B: Float[Tensor, "... r n"]):
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            raise TypeError(
                f"FactoredMatrix takes two tensors, got {type(A).__name__} and {type(B).__name__}"
            )
        if A.dim() < 2 or B.dim() < 2:
            raise ValueError(
                f"both factors must be matrices (at least 2-D): A is {tuple(A.shape)}, B is {tuple(B.shape)}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                f"inner dimensions differ: A is {tuple(A.shape)} [..., m, r] but B is "
                f"{tuple(B.shape)} [..., r, n]; A.shape[-1] must equal B.shape[-2]"
            )
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(
                f"leading dimensions do not broadcast: A is {tuple(A.shape)}, B is {tuple(B.shape)}"
            ) from None
        self.A = A.expand(*lead, *A.shape[-2:])  # views: broadcasting copies nothing
        self.B = B.expand(*lead, *B.shape[-2:])

    # ---- shape ---------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """The shape of the product: ``[..., m, n]``."""
        return torch.Size((*self.A.shape[:-1], self.B.shape[-1]))

    @property
    def ndim(self) -> int:
        return self.A.dim()

    @property
    def rank(self) -> int:
        """The inner dimension r: the product's rank is at most this."""
        return self.A.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, rank={self.rank})"

    def __getitem__(self, index) -> FactoredMatrix:
        """Index the leading dimensions, e.g. ``model.QK[layer, head]``."""
        index = index if isinstance(index, tuple) else (index,)
        lead = self.ndim - 2
        if any(i is Ellipsis or i is None for i in index) or len(index) > lead:
            raise IndexError(
                f"a FactoredMatrix of shape {tuple(self.shape)} indexes only its {lead} leading "
                f"dimension(s) with ints, slices or index tensors; got {index!r}. "
                "Materialise with .AB to index rows and columns."
            )
        return FactoredMatrix(self.A[index], self.B[index])

    # ---- products ------------------------------------------------------------------

    @property
    def AB(self) -> Float[Tensor, "... m n"]:
        """The product, materialised: ``m * n`` numbers per matrix -- ask only when small."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... r r"]:
        """The small core ``B @ A`` of a square matrix (same nonzero eigenvalues as ``A @ B``)."""
        self._need_square("BA")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.mT, self.A.mT)

    def __matmul__(self, other: Tensor | FactoredMatrix) -> FactoredMatrix | Tensor:
        """``self @ other``: a FactoredMatrix, or a tensor when ``other`` is a vector."""
        if isinstance(other, FactoredMatrix):
            _check_inner(self.shape, other.shape)
            if other.rank < self.rank:  # keep the smaller inner dimension
                return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() == 1:
            _check_inner(self.shape, (other.shape[0], 1))
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        _check_inner(self.shape, other.shape)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix | Tensor:
        """``other @ self``, for a tensor ``other``: ``[..., k, m] @ [..., m, n]``."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() == 1:
            _check_inner((1, other.shape[0]), self.shape)
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        _check_inner(other.shape, self.shape)
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """``c * M``: the product scaled by a scalar (a number or a one-element tensor).

        Anything else is refused: ``A * v`` for a vector would scale A's columns, i.e. insert
        a diagonal between the factors, which is not an elementwise product of ``A @ B``
        (TransformerLens refuses it too). Write ``FactoredMatrix(A * v, B)`` for that."""
        if isinstance(scalar, Tensor):
            if scalar.numel() != 1:
                raise ValueError(
                    f"FactoredMatrix * a tensor of shape {tuple(scalar.shape)}: only a scalar "
                    "can scale a factored matrix; for A diag(v) B write FactoredMatrix(A * v, B)"
                )
            scalar = scalar.reshape(())
        elif isinstance(scalar, bool) or not isinstance(scalar, numbers.Number):
            return NotImplemented
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self.A, self.B)

    # ---- spectra and norms, from r x r work ----------------------------------------

    def svd(
        self,
    ) -> tuple[Float[Tensor, "... m k"], Float[Tensor, "... k"], Float[Tensor, "... n k"]]:
        """``U, S, V`` with ``self.AB == U @ S.diag_embed() @ V.mT``, ``k = min(m, r, n)``.

        With ``A = Qa Ra`` and ``Bᵀ = Qb Rb`` (reduced QR), ``A B = Qa (Ra Rbᵀ) Qbᵀ``: the
        SVD of the small core ``Ra Rbᵀ`` rotated by the orthonormal ``Qa``, ``Qb``. Like
        TransformerLens, ``V`` (not ``Vᵀ``) is returned.
        """
        Qa, Ra = torch.linalg.qr(_linalg_dtype(self.A))
        Qb, Rb = torch.linalg.qr(_linalg_dtype(self.B).mT)
        Uc, S, Vch = torch.linalg.svd(Ra @ Rb.mT, full_matrices=False)
        return Qa @ Uc, S, Qb @ Vch.mT

    @property
    def eigenvalues(self) -> Complex[Tensor, "... r"]:
        """The eigenvalues of the square ``A @ B`` that can be nonzero: those of the r × r
        ``B @ A`` (if ``B A v = λ v`` then ``A B (A v) = λ A v``; the other m - r are 0)."""
        self._need_square("eigenvalues")
        core = _linalg_dtype(self.B) @ _linalg_dtype(self.A)
        # the core is tiny; float64 is more accurate there, and torch's float32 CPU eig is slow
        wide = core.double() if core.device.type in ("cpu", "cuda") else core
        return torch.linalg.eigvals(wide).to(torch.promote_types(core.dtype, torch.complex64))

    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm: ``‖A B‖²_F = tr(Bᵀ Aᵀ A B) = tr((Aᵀ A)(B Bᵀ))``, two r × r Grams."""
        A, B = _linalg_dtype(self.A), _linalg_dtype(self.B)
        squared = ((A.mT @ A) * (B @ B.mT)).sum((-2, -1))  # tr(XY) = Σ X∘Yᵀ; both symmetric
        return squared.clamp(min=0).sqrt()

    def _need_square(self, what: str) -> None:
        m, n = self.shape[-2:]
        if m != n:
            raise ValueError(f"{what} needs a square matrix; this one is {m} × {n}")


def _check_inner(left: tuple[int, ...], right: tuple[int, ...]) -> None:
    if left[-1] != right[-2]:
        raise ValueError(
            f"cannot multiply a [..., {left[-2]}, {left[-1]}] matrix by a "
            f"[..., {right[-2]}, {right[-1]}] one: {left[-1]} != {right[-2]} "
            f"(shapes {tuple(left)} @ {tuple(right)})"
        )
    try:
        torch.broadcast_shapes(left[:-2], right[:-2])
    except RuntimeError:
        raise ValueError(
            f"cannot multiply: leading dimensions do not broadcast ({tuple(left)} @ {tuple(right)})"
        ) from None


def _linalg_dtype(t: Tensor) -> Tensor:
    """``torch.linalg`` has no 16-bit kernels: compute in float32 there."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
