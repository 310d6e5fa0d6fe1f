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
    with pytest.raises(IndexError, match="too many indices"):
        M[0, 1, 2, 3]
    with pytest.raises(IndexError, match="new axes"):
        M[0, None]
    with pytest.raises(TypeError, match="two tensors"):
        FactoredMatrix(A.numpy(), B)
    with pytest.raises(TypeError):
        M @ "not a matrix"


def tl_pair(*lead, m=10, r=4, n=7, seed=0):
    """Ours and TransformerLens' FactoredMatrix on the same float64 factors."""
    tl = pytest.importorskip("transformer_lens")
    A, B = factors(*lead, m=m, r=r, n=n, seed=seed)
    return FactoredMatrix(A, B), tl.FactoredMatrix(A, B)


def assert_same(ours, theirs):
    """Same shape, same inner dimension, same product (exactly: the same factors sliced)."""
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert ours.rank == theirs.mdim
    torch.testing.assert_close(ours.AB, theirs.AB, rtol=1e-12, atol=1e-12)


INDICES = [
    0, -1, (0, 1), (slice(None), 2), (..., slice(None, 5)), (..., slice(2, 8), 3), (1, ..., 0),
    (slice(None), slice(None), slice(None, 5)), (1, 2, -1, -1), (torch.tensor(1), 0),
    (torch.tensor([1, 0]), slice(None), slice(3)), (None, 0), (..., torch.tensor([0, 2, 3]), slice(None)),
]  # fmt: skip


@pytest.mark.parametrize("index", INDICES, ids=repr)
def test_indexing_rows_columns_and_leading_dimensions_as_transformer_lens(index):
    ours, theirs = tl_pair(2, 3)
    assert_same(ours[index], theirs[index])
    # and what it stands for: the product indexed, an integer row/column kept as length 1
    ix = index if isinstance(index, tuple) else (index,)
    if not any(i is None for i in ix):
        got = ours[index].AB
        assert got.numel() == theirs[index].AB.numel()


def test_indexing_a_plain_matrix():
    ours, theirs = tl_pair(m=10, r=4, n=7)
    assert ours[:, :5].shape == (10, 5) and ours[0].shape == (1, 7)
    torch.testing.assert_close(ours[:, :5].AB, ours.AB[:, :5])
    torch.testing.assert_close(ours[0].AB, ours.AB[:1])
    torch.testing.assert_close(ours[3, 2].AB, ours.AB[3:4, 2:3])
    torch.testing.assert_close(ours[-1, -1].AB, ours.AB[-1:, -1:])
    for index in [(slice(None), slice(None, 5)), 0, (3, 2), (-1, -1), (slice(2, 4), [0, 5])]:
        assert_same(ours[index], theirs[index])


@pytest.mark.parametrize("cols", [2, 4, 5, 9])
def test_products_keep_the_inner_dimension_transformer_lens_keeps(cols):
    """``F @ X`` is ``A (B X)`` while F has more columns than its rank, else ``(A B) X``: the
    result's inner dimension is min(rank, n) in both libraries, on either side and between
    two factored matrices."""
    ours, theirs = tl_pair(m=6, r=4, n=7)
    over_ours, over_theirs = tl_pair(m=6, r=9, n=7, seed=2)  # rank above n: collapsed
    X0 = torch.randn(7, cols, dtype=torch.float64)
    assert_same(over_ours @ X0, over_theirs @ X0)
    assert (over_ours @ X0).rank == 7
    assert_same(X0.T @ over_ours.T, X0.T @ over_theirs.T)
    X = torch.randn(7, cols, dtype=torch.float64)
    Y = torch.randn(cols, 6, dtype=torch.float64)
    assert_same(ours @ X, theirs @ X)
    assert_same(Y @ ours, Y @ theirs)
    assert (ours @ X).rank == 4
    other_ours, other_theirs = tl_pair(m=7, r=min(cols, 7), n=5, seed=1)
    assert_same(ours @ other_ours, theirs @ other_theirs)
    v = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(ours @ v, theirs @ v)
    w = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(w @ ours, w @ theirs)


def test_matmul_with_tensor_likes():
    """A numpy array or a nested list multiplies as the tensor it stands for."""
    M = FactoredMatrix(*factors(m=6, r=4, n=7))
    X = torch.randn(7, 9, dtype=torch.float64)
    torch.testing.assert_close((M @ X.numpy()).AB, M.AB @ X)
    torch.testing.assert_close((X.T.numpy() @ M.T).AB, X.T @ M.AB.T)
    torch.testing.assert_close(M @ X[:, 0].tolist(), M.AB @ X[:, 0])
    torch.testing.assert_close((M @ X.tolist()).AB, M.AB @ X)


def test_svd_helpers_pair_corner_and_unsqueeze_as_transformer_lens():
    ours, theirs = tl_pair(2, 3, m=10, r=4, n=7)
    # singular values: the same numbers; vectors agree up to each column's sign
    torch.testing.assert_close(ours.S, theirs.S, rtol=1e-10, atol=1e-10)
    assert ours.U.shape == theirs.U.shape and ours.V.shape == theirs.V.shape
    sign_u = (ours.U * theirs.U).sum(-2).sign()
    torch.testing.assert_close(ours.U, theirs.U * sign_u[..., None, :], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ours.V, theirs.V * sign_u[..., None, :], rtol=1e-8, atol=1e-8)
    with pytest.warns(DeprecationWarning):
        theirs_vh = theirs.Vh
    torch.testing.assert_close(ours.Vh, theirs_vh * sign_u[..., None, :], rtol=1e-8, atol=1e-8)
    # collapses: the same up to the sign of each singular direction
    left, right = ours.collapse_l(), ours.collapse_r()
    assert left.shape == theirs.collapse_l().shape and right.shape == theirs.collapse_r().shape
    torch.testing.assert_close(ours.U @ left, ours.AB)  # the law: AB = U collapse_l
    torch.testing.assert_close(right @ ours.V.mT, ours.AB)
    torch.testing.assert_close(
        left, theirs.collapse_l() * sign_u[..., :, None], rtol=1e-8, atol=1e-8
    )
    torch.testing.assert_close(
        right, theirs.collapse_r() * sign_u[..., None, :], rtol=1e-8, atol=1e-8
    )
    torch.testing.assert_close(ours.make_even().AB, ours.AB)
    assert ours.pair[0] is ours.A and ours.pair[1] is ours.B
    torch.testing.assert_close(ours.get_corner(), theirs.get_corner())
    torch.testing.assert_close(ours.get_corner(5), theirs.get_corner(5))
    for k in (0, 1, -3):
        assert_same(ours.unsqueeze(k), theirs.unsqueeze(k))
    assert (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)


def test_factored_matrix_refuses_a_non_scalar_factor():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, generator=g), torch.randn(2, 3, generator=g)
    M = FactoredMatrix(A, B)
    with pytest.raises(ValueError, match="only a scalar"):
        M * torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="only a scalar"):
        torch.tensor([1.0, 2.0]) * M
    torch.testing.assert_close((M * 2.0).AB, 2.0 * (A @ B))
    torch.testing.assert_close((torch.tensor(3.0) * M).AB, 3.0 * (A @ B))
