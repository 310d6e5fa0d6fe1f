"""Circuit statistics from the weights alone: how heads compose, and which heads copy.

**Composition** (Elhage et al. 2021, with TransformerLens' definition). An earlier head A
writes ``x @ OV_A`` into the stream; a later head B reads it through its query, key or
value side. The score is how much of the two matrices' "size" survives the product:

    score(A → B) = ‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F),    W_A = OV_A = W_V^A W_O^A

    Q-composition:  W_B = QK_B   = W_Q^B W_K^Bᵀ   (A's output feeds B's queries)
    K-composition:  W_B = QK_Bᵀ  = W_K^B W_Q^Bᵀ   (A's output feeds B's keys)
    V-composition:  W_B = OV_B   = W_V^B W_O^B    (A's output feeds B's values)

All matrices are d_model × d_model with rank d_head, multiplied on the right as stated in
``resid/model.py``; the norms are computed from d_head × d_head Gram matrices, never from a
d_model × d_model product. LayerNorm and biases are left out, as in TransformerLens.

**Copying** (Elhage et al. 2021): a head copies when attending to token t raises t's own
logit, i.e. its full OV circuit ``W_E W_V W_O W_U`` (d_vocab × d_vocab) has mostly positive
eigenvalues. The score is ``Σλ / Σ|λ|`` in [-1, 1] over those eigenvalues, taken from the
d_head × d_head core ``W_O W_U W_E W_V`` (same nonzero eigenvalues: cyclic permutation).

Attention-pattern detectors (previous-token, duplicate-token, induction) live in
``resid.analysis.detectors``.

>>> k_comp = composition_scores(model, "K")   # [layer, head, layer, head]
>>> k_comp[0, 1, 1, 4]                        # head 0.1's OV into head 1.4's keys
>>> copying_scores(model)                     # [layer, head]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

from resid.core.factored import FactoredMatrix

if TYPE_CHECKING:
    from resid.core.head import Head
    from resid.core.model import Model

Mode = Literal["Q", "K", "V"]


def _reader(mode: Mode, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor) -> FactoredMatrix:
    """The later head's matrix W_B for a composition ``mode``."""
    if mode == "Q":
        return FactoredMatrix(W_Q, W_K.mT)
    if mode == "K":
        return FactoredMatrix(W_K, W_Q.mT)
    if mode == "V":
        return FactoredMatrix(W_V, W_O)
    raise ValueError(f"composition mode must be 'Q', 'K' or 'V', not {mode!r}")


def _defined(model: Model, mode: Mode) -> None:
    if mode in ("Q", "K") and model.cfg.positional == "rotary":
        raise ValueError(
            f"{mode}-composition reads the later head's QK circuit, which for rotary heads "
            "depends on the query-key distance: only V-composition is defined here"
        )


def composition_score(earlier: Head, later: Head, mode: Mode) -> Float[Tensor, ""]:
    """``‖OV_earlier W_later‖_F / (‖OV_earlier‖_F ‖W_later‖_F)`` for one pair of heads.

    >>> composition_score(model.head(0, 1), model.head(1, 4), "K")
    """
    if earlier.layer >= later.layer:
        raise ValueError(
            f"head {earlier.layer}.{earlier.index} must be in an earlier layer than "
            f"head {later.layer}.{later.index} to write into what it reads"
        )
    _defined(later.model, mode)
    left = earlier.ov
    right = _reader(mode, later.W_Q, later.W_K, later.W_V, later.W_O)
    return (left @ right).norm() / (left.norm() * right.norm())


@torch.no_grad()
def composition_scores(model: Model, mode: Mode) -> Float[Tensor, "layer_a head_a layer_b head_b"]:
    """Every head pair's ``mode``-composition score (see the module docstring).

    Entry ``[l1, h1, l2, h2]`` scores head ``l1.h1``'s OV feeding head ``l2.h2``; it is
    filled only for ``l1 < l2`` and is 0 elsewhere (TransformerLens'
    ``all_composition_scores`` convention). Work is d_head × d_head per pair.
    """
    _defined(model, mode)
    W_Q, W_K, W_V, W_O = (w.float() for w in (model.W_Q, model.W_K, model.W_V, model.W_O))
    left = FactoredMatrix(W_V, W_O)
    right = _reader(mode, W_Q, W_K, W_V, W_O)
    # ‖A1 B1 A2 B2‖² = tr((A1ᵀA1) M (B2B2ᵀ) Mᵀ) with M = B1 A2: only [d_head, d_head] products.
    gram_l = left.A.mT @ left.A  # [layer, head, e, e]
    gram_r = right.B @ right.B.mT  # [layer, head, e, e]
    n_layers, n_heads = W_Q.shape[:2]
    scores = W_Q.new_zeros(n_layers, n_heads, n_layers, n_heads)
    for l1 in range(n_layers - 1):  # one earlier layer at a time bounds memory
        later = slice(l1 + 1, None)
        M = einsum(left.B[l1], right.A[later], "h1 e d, l2 h2 d f -> h1 l2 h2 e f")
        GM = einsum(gram_l[l1], M, "h1 e g, h1 l2 h2 g f -> h1 l2 h2 e f")
        squared = ((GM @ gram_r[later]) * M).sum((-2, -1))  # tr(X Mᵀ) = Σ X∘M
        scores[l1, :, later] = squared.clamp(min=0).sqrt()
    norms_l, norms_r = left.norm(), right.norm()  # [layer, head]
    return scores / norms_l[:, :, None, None] / norms_r[None, None]


@torch.no_grad()
def copying_scores(model: Model) -> Float[Tensor, "layer head"]:
    """Every head's OV copying score ``Σλ / Σ|λ|`` over the eigenvalues of its full OV
    circuit ``W_E W_V W_O W_U``: 1 for a head that only boosts the token it attends to,
    -1 for one that only suppresses it.

    The eigenvalues come from the d_head × d_head core ``W_O (W_U W_E) W_V`` (the
    d_model × d_model ``W_U W_E`` is computed once), never from the d_vocab² matrix.
    """
    W_UE = (model.W_U @ model.W_E).float()  # [d_model, d_model]
    full = FactoredMatrix(model.W_V.float(), model.W_O.float() @ W_UE)  # similar to full OV
    eigenvalues = full.eigenvalues  # [layer, head, d_head], complex
    return eigenvalues.sum(-1).real / eigenvalues.abs().sum(-1)
