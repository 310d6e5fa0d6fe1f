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
from functools import cached_property

import torch
from jaxtyping import Complex, Float
from torch import Tensor


class FactoredMatrix:
    """The matrix ``A @ B`` with ``A: [..., m, r]`` and ``B: [..., r, n]``.

    >>> qk = FactoredMatrix(W_Q, W_K.T)       # [768, 64] @ [64, 768]
    >>> qk.norm(), qk.svd()[1][:5], (qk @ W_E.T).shape
    """

    __array_ufunc__ = None  # ``ndarray @ F``: numpy defers to ``F.__rmatmul__``

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
    def ldim(self) -> int:
        """TransformerLens' names: rows ``m`` (``ldim``), inner ``r`` (``mdim``), columns
        ``n`` (``rdim``)."""
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        return self.rank

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, rank={self.rank})"

    def __getitem__(self, index) -> FactoredMatrix:
        """Index like the product, without forming it: leading dimensions
        (``model.QK[layer, head]``), then rows and columns (``f[:, :5]``, ``f[0]``).

        As in TransformerLens, an integer row or column index keeps its axis (length 1), so
        the result is still a matrix: ``f[0]`` is ``[1, n]``. Rows index ``A``, columns
        ``B``; the inner dimension is untouched.

        >>> f[..., :5, 2:].shape          # the top-right block, still factored
        """
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) > 1:
            raise IndexError("an index can only have a single ellipsis (...)")
        consumed = sum(_index_ndim(i) for i in index)
        if any(i is Ellipsis for i in index):
            at = next(k for k, i in enumerate(index) if i is Ellipsis)
            fill = (slice(None),) * (self.ndim - consumed)
            index = index[:at] + fill + index[at + 1 :]
            consumed = self.ndim
        if consumed > self.ndim:
            raise IndexError(
                f"too many indices for a FactoredMatrix of shape {tuple(self.shape)}: {index!r}"
            )
        lead = self.ndim - 2
        seen, parts = 0, []  # (item, the axis of the product it indexes)
        for item in index:
            if item is None and seen >= lead:
                raise IndexError(
                    "a FactoredMatrix takes new axes (None) only among its leading dimensions; "
                    "add them with .unsqueeze(k), or materialise with .AB"
                )
            parts.append((item, seen))
            seen += _index_ndim(item)
        before = tuple(item for item, at in parts if at < lead)
        rows = [item for item, at in parts if at == lead]
        cols = [item for item, at in parts if at == lead + 1]
        rows_ix = (_keep_axis(rows[0]),) if rows else ()
        cols_ix = (_keep_axis(cols[0]),) if cols else ()
        A = self.A[before + rows_ix]
        B = self.B[before + ((slice(None),) + cols_ix if cols else ())]
        return FactoredMatrix(A, B)

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """A new leading axis of length 1 at ``dim`` (of the factors: ``dim`` must lie among
        the leading dimensions, or count from the end past the two matrix axes).

        >>> model.OV[0].unsqueeze(0).shape      # [1, head, d_model, d_model]
        """
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    @property
    def pair(self) -> tuple[Float[Tensor, "... m r"], Float[Tensor, "... r n"]]:
        """The two factors ``(A, B)``."""
        return self.A, self.B

    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left ``k`` entries along every axis of the product (leading ones too),
        computed from ``k`` rows of ``A`` and ``k`` columns of ``B`` only."""
        small = self.A[..., :k, :] @ self.B[..., :, :k]
        return small[tuple(slice(k) for _ in range(small.dim()))]

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

    def __matmul__(self, other) -> FactoredMatrix | Tensor:
        """``self @ other``: a FactoredMatrix, or a tensor when ``other`` is a vector.

        ``other`` is a tensor (or anything ``torch.as_tensor`` takes: a numpy array, a
        nested list) or a FactoredMatrix. As in TransformerLens, the product keeps the
        smaller inner dimension: ``A (B X)`` while this matrix has more columns than its
        rank, else ``(A B) X`` (inner dimension ``n``). ``F @ G`` is ``(F @ G.A) @ G.B``.

        >>> (model.OV[0, 3] @ model.W_U).shape      # [d_model, d_vocab], still factored
        """
        if isinstance(other, FactoredMatrix):
            _check_inner(self.shape, other.shape)
            return (self @ other.A) @ other.B
        other = self._tensor(other)
        if other is None:
            return NotImplemented
        if other.dim() < 2:
            _check_inner(self.shape, (other.shape[0], 1))
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        _check_inner(self.shape, other.shape)
        if self.rdim > self.rank:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other) -> FactoredMatrix | Tensor:
        """``other @ self`` for a tensor-like ``other`` ``[..., k, m]`` (or a vector
        ``[m]``); keeps the smaller inner dimension as ``__matmul__`` does."""
        other = self._tensor(other)
        if other is None:
            return NotImplemented
        if other.dim() < 2:
            _check_inner((1, other.shape[0]), self.shape)
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        _check_inner(other.shape, self.shape)
        if self.ldim > self.rank:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _tensor(self, other) -> Tensor | None:
        """``other`` as a tensor on this matrix's device (numpy arrays and nested lists in
        this matrix's dtype), or ``None`` when it is not tensor-like."""
        if isinstance(other, Tensor):
            return other
        if isinstance(other, (str, bytes, numbers.Number)) or not (
            hasattr(other, "__array__") or isinstance(other, (list, tuple))
        ):
            return None
        dtype = self.dtype if isinstance(other, (list, tuple)) else None
        try:
            t = torch.as_tensor(other, dtype=dtype, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            return None
        return t.to(self.dtype)

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
        TransformerLens, ``V`` (not ``Vᵀ``) is returned. Computed once per matrix.
        """
        return self._svd

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        Qa, Ra = torch.linalg.qr(_linalg_dtype(self.A))
        Qb, Rb = torch.linalg.qr(_linalg_dtype(self.B).mT)
        Uc, S, Vch = torch.linalg.svd(Ra @ Rb.mT, full_matrices=False)
        return Qa @ Uc, S, Qb @ Vch.mT

    @property
    def U(self) -> Float[Tensor, "... m k"]:
        """Left singular vectors (``svd()[0]``)."""
        return self.svd()[0]

    @property
    def S(self) -> Float[Tensor, "... k"]:
        """Singular values, largest first (``svd()[1]``)."""
        return self.svd()[1]

    @property
    def V(self) -> Float[Tensor, "... n k"]:
        """Right singular vectors as columns (``svd()[2]``): ``AB == U diag(S) Vᵀ``."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[Tensor, "... n k"]:
        """TransformerLens' name for ``V`` (it is ``V``, not ``Vᵀ``, there too)."""
        return self.svd()[2]

    def collapse_l(self) -> Float[Tensor, "... k n"]:
        """``diag(S) Vᵀ``: the product with its left orthonormal factor ``U`` dropped
        (``AB == U @ collapse_l()``)."""
        return self.S[..., :, None] * self.V.mT

    def collapse_r(self) -> Float[Tensor, "... m k"]:
        """``U diag(S)``: the product with its right orthonormal factor dropped
        (``AB == collapse_r() @ V.mT``)."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> FactoredMatrix:
        """The same product as ``(U √S)(√S Vᵀ)``: both factors carry half the spectrum."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

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


def _index_ndim(item) -> int:
    """How many axes of the product an index item consumes (a boolean mask: its own)."""
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, Tensor) and item.dtype in (torch.bool, torch.uint8):
        return item.dim()
    if isinstance(item, (list, tuple)):
        t = torch.as_tensor(item)
        return t.dim() if t.dtype == torch.bool else 1
    return 1


def _keep_axis(item):
    """An integer row or column index as a length-1 slice, so the axis stays (as in
    TransformerLens): the result of indexing is still a matrix."""
    if isinstance(item, bool):
        return item
    if isinstance(item, numbers.Integral) or (
        isinstance(item, Tensor)
        and item.dim() == 0
        and not item.dtype.is_floating_point
        and item.dtype != torch.bool
    ):
        i = int(item)
        return slice(i, i + 1 if i != -1 else None)
    return item
