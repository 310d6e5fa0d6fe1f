"""FactoredMatrix against the matrix it stands for (materialised, in float64) and against
TransformerLens' FactoredMatrix on the same factors."""

import pytest
import torch

from resid.core.factored import FactoredMatrix


def factors(*lead, m=10, r=4, n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*lead, m, r, generator=g, dtype=dtype),
        torch.randn(*lead, r, n, generator=g, dtype=dtype),
    )


def assert_same_eigenvalues(ours: torch.Tensor, ref: torch.Tensor, atol: float) -> float:
    """Each of ``ours`` has its own nearest partner in ``ref`` (a greedy matching)."""
    ref = list(ref.tolist())
    worst = 0.0
    for lam in ours.tolist():
        j = min(range(len(ref)), key=lambda i: abs(ref[i] - lam))
        worst = max(worst, abs(ref.pop(j) - lam))
    assert worst <= atol, worst
    return worst


def test_shape_product_transpose_and_indexing():
    A, B = factors(2, 3)
    M = FactoredMatrix(A, B)
    assert M.shape == (2, 3, 10, 7) and M.rank == 4 and M.ndim == 4
    torch.testing.assert_close(M.AB, torch.einsum("lhmr,lhrn->lhmn", A, B))
    torch.testing.assert_close(M.T.AB, M.AB.mT)
    torch.testing.assert_close(M[1, 2].AB, A[1, 2] @ B[1, 2])
    torch.testing.assert_close(M[:, 0].AB, M.AB[:, 0])
    torch.testing.assert_close(M[torch.tensor([1, 0])].AB, M.AB[[1, 0]])
    torch.testing.assert_close((-M).AB, -M.AB)
    torch.testing.assert_close((2.5 * M).AB, 2.5 * M.AB)
    # leading dimensions broadcast without copying
    shared = FactoredMatrix(A, B[0, 0])
    assert shared.shape == (2, 3, 10, 7) and shared.B.data_ptr() == B.data_ptr()
    torch.testing.assert_close(shared.AB, A @ B[0, 0])


def test_matmul_with_tensors_and_factored_matrices_on_both_sides():
    A, B = factors(3)
    M = FactoredMatrix(A, B)
    X = torch.randn(7, 5, dtype=torch.float64)
    Y = torch.randn(3, 6, 10, dtype=torch.float64)
    v, w = torch.randn(7, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close((M @ X).AB, M.AB @ X)
    torch.testing.assert_close((Y @ M).AB, Y @ M.AB)
    torch.testing.assert_close(M @ v, M.AB @ v)
    torch.testing.assert_close(w @ M, w @ M.AB)
    thin = FactoredMatrix(*factors(m=7, r=2, n=9, seed=1))  # rank 2 < 4: kept as the inner dim
    wide = FactoredMatrix(*factors(m=7, r=6, n=9, seed=2))
    assert (M @ thin).rank == 2 and (M @ wide).rank == 4
    torch.testing.assert_close((M @ thin).AB, M.AB @ thin.AB)
    torch.testing.assert_close((M @ wide).AB, M.AB @ wide.AB)
    torch.testing.assert_close((thin.T @ M.T).AB, thin.AB.T @ M.AB.mT)


def test_svd_eigenvalues_and_norm_against_the_materialised_matrix():
    M = FactoredMatrix(*factors(2, 3, m=12, r=5, n=9))
    U, S, V = M.svd()
    assert U.shape == (2, 3, 12, 5) and S.shape == (2, 3, 5) and V.shape == (2, 3, 9, 5)
    torch.testing.assert_close(U @ S.diag_embed() @ V.mT, M.AB)
    torch.testing.assert_close(S, torch.linalg.svdvals(M.AB)[..., :5])
    eye = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    torch.testing.assert_close(U.mT @ U, eye)
    torch.testing.assert_close(V.mT @ V, eye)
    torch.testing.assert_close(M.norm(), torch.linalg.matrix_norm(M.AB))

    square = FactoredMatrix(*factors(m=12, r=5, n=12, seed=3))
    ref = torch.linalg.eigvals(square.AB)  # 12 eigenvalues: 5 from the core, 7 zeros
    ours = square.eigenvalues
    assert ours.shape == (5,)
    nonzero = ref[ref.abs().argsort(descending=True)[:5]]
    assert_same_eigenvalues(ours, nonzero, atol=1e-9)
    assert ref.abs().sort().values[:7].max() < 1e-9


def test_rank_deficient_and_wide_factors():
    """r > m and r > n: the SVD has min(m, r, n) values and still reconstructs."""
    M = FactoredMatrix(*factors(m=3, r=8, n=4, seed=4))
    U, S, V = M.svd()
    assert S.shape == (3,)
    torch.testing.assert_close(U @ S.diag_embed() @ V.T, M.AB)
    torch.testing.assert_close(M.norm(), torch.linalg.matrix_norm(M.AB))


def test_against_transformer_lens_factored_matrix():
    tl = pytest.importorskip("transformer_lens")
    A, B = factors(2, 3, m=16, r=4, n=16, dtype=torch.float32)
    ours, theirs = FactoredMatrix(A, B), tl.FactoredMatrix(A, B)
    torch.testing.assert_close(ours.svd()[1], theirs.S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.norm(), theirs.norm(), rtol=1e-5, atol=1e-5)
    X = torch.randn(16, 5)
    torch.testing.assert_close((ours @ X).AB, (theirs @ X).AB)
    torch.testing.assert_close((X.T @ ours).AB, (X.T @ theirs).AB)
    torch.testing.assert_close((ours @ ours.T).AB, (theirs @ theirs.T).AB, rtol=1e-5, atol=1e-4)
    for i in range(2):
        for j in range(3):
            assert_same_eigenvalues(
                ours.eigenvalues[i, j], theirs.eigenvalues[i, j].to(torch.complex64), atol=1e-4
            )


def test_bad_input_gets_clear_errors():
    A, B = factors(2)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        FactoredMatrix(A, B.mT)
    with pytest.raises(ValueError, match="at least 2-D"):
        FactoredMatrix(A[0, 0], B)
    with pytest.raises(ValueError, match="do not broadcast"):
        FactoredMatrix(torch.randn(2, 10, 4), torch.randn(3, 4, 7))
    M = FactoredMatrix(A, B)  # [2, 10, 7]
    with pytest.raises(ValueError, match="cannot multiply"):
        M @ torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot multiply"):
        torch.randn(3, 7, dtype=torch.float64) @ M
    with pytest.raises(ValueError, match="cannot multiply"):
        M @ M
    with pytest.raises(ValueError, match="cannot multiply"):
        M @ torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not broadcast"):
        M @ torch.randn(3, 7, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        _ = M.eigenvalues
    with pytest.raises(IndexError, match="leading"):
        M[0, 1]
    with pytest.raises(TypeError, match="two tensors"):
        FactoredMatrix(A.numpy(), B)
