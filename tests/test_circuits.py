"""Composition and copying scores against TransformerLens, materialised matrices and
hand-built heads whose answer is known."""

import pytest
import torch
from test_factored import assert_same_eigenvalues
from test_head import small_vocab_model

import resid
from resid.analysis.circuits import composition_score, composition_scores, copying_scores

transformer_lens = pytest.importorskip("transformer_lens")


@pytest.fixture(scope="module")
def bridge(tiny_hf):
    from test_transformer_lens import bridge_for

    return bridge_for(tiny_hf)


def test_stacked_weights_equal_transformer_lens(tiny, bridge):
    names = ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"]
    names += ["W_in", "W_out", "b_in", "b_out"]
    for name in names:
        ours, theirs = getattr(tiny, name), getattr(bridge, name)
        assert ours.shape == theirs.shape, name
        assert torch.equal(ours, theirs), name
    torch.testing.assert_close(tiny.QK.AB, bridge.QK.AB, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny.OV.AB, bridge.OV.AB, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_transformer_lens_bridge(tiny, bridge, mode):
    ours = composition_scores(tiny, mode)
    theirs = bridge.all_composition_scores(mode).scores
    assert ours.shape == theirs.shape == (2, 4, 2, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours[1] == 0).all() and (ours[0, :, 0] == 0).all()  # only earlier -> later


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_transformer_lens_definition_deeper(mode):
    """Four layers, through TL's own ``composition_scores`` on TL FactoredMatrices of the
    same weights, and the single-pair function against the materialised matrices."""
    from transformer_lens import FactoredMatrix as TLFactoredMatrix
    from transformer_lens.utilities import composition_scores as tl_scores

    torch.manual_seed(1)
    model = resid.Model(
        resid.Config(n_layers=4, n_heads=3, d_model=48, d_head=16, d_mlp=8, d_vocab=10, n_ctx=4)
    )
    model.init_weights(0.3)
    left = TLFactoredMatrix(model.W_V, model.W_O)
    qk = TLFactoredMatrix(model.W_Q, model.W_K.mT)
    right = {"Q": qk, "K": qk.T, "V": left}[mode]
    theirs = tl_scores(left, right, broadcast_dims=True)
    earlier = torch.arange(4)[:, None, None, None] < torch.arange(4)[None, None, :, None]
    theirs = torch.where(earlier, theirs, 0)
    ours = composition_scores(model, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    a, b = model.head(0, 2), model.head(3, 1)
    W_A = a.W_V.double() @ a.W_O.double()
    W_B = {
        "Q": b.W_Q.double() @ b.W_K.double().T,
        "K": b.W_K.double() @ b.W_Q.double().T,
        "V": b.W_V.double() @ b.W_O.double(),
    }[mode]
    hand = torch.linalg.matrix_norm(W_A @ W_B) / (
        torch.linalg.matrix_norm(W_A) * torch.linalg.matrix_norm(W_B)
    )
    torch.testing.assert_close(composition_score(a, b, mode).double(), hand, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours[0, 2, 3, 1].double(), hand, rtol=1e-5, atol=0)


def test_copying_score_of_hand_built_heads():
    """With W_O = c W_Vᵀ the full OV is c (W_E W_V)(W_E W_V)ᵀ: a PSD matrix times c, so
    every eigenvalue has c's sign and Σλ/Σ|λ| = sign(c)."""
    model = small_vocab_model()
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.W_O[0] = attn.W_V[0].T  # copies
        attn.W_O[1] = -3 * attn.W_V[1].T  # suppresses
    scores = copying_scores(model)
    assert scores.shape == (2, 4)
    torch.testing.assert_close(scores[1, :2], torch.tensor([1.0, -1.0]), rtol=0, atol=1e-5)
    assert (scores.abs() <= 1 + 1e-6).all()
    assert scores[0].abs().max() < 0.99  # random heads are neither


def full_ov_float64(model, head):
    return model.W_E.double() @ (head.W_V.double() @ head.W_O.double()) @ model.W_U.double()


def test_copying_eigenvalues_equal_those_of_the_materialised_full_ov():
    """d_vocab = 200, d_head = 8: the 200 × 200 full OV has 8 nonzero eigenvalues, which the
    factored form finds from an 8 × 8 core."""
    model = small_vocab_model(seed=3)
    scores = copying_scores(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's eig on a 200 x 200 matrix only loses from threading
    try:
        refs = {
            (layer, h): torch.linalg.eigvals(full_ov_float64(model, model.head(layer, h)))
            for layer, h in [(0, 0), (0, 3), (1, 1), (1, 2)]
        }
    finally:
        torch.set_num_threads(threads)
    for (layer, h), ref in refs.items():  # 200 eigenvalues each, 192 of them ~0
        order = ref.abs().argsort(descending=True)
        assert ref[order[8:]].abs().max() < 1e-10
        ours = model.head(layer, h).full_ov.eigenvalues
        assert ours.shape == (8,)
        assert_same_eigenvalues(ours.to(torch.complex128), ref[order[:8]], atol=1e-5)
        hand = ref.sum().real / ref.abs().sum()
        torch.testing.assert_close(scores[layer, h].double(), hand, rtol=0, atol=1e-5)


def test_bad_input_gets_clear_errors(tiny):
    with pytest.raises(ValueError, match="'Q', 'K' or 'V'"):
        composition_scores(tiny, "X")
    with pytest.raises(ValueError, match="earlier layer"):
        composition_score(tiny.head(1, 0), tiny.head(0, 1), "K")
    with pytest.raises(ValueError, match="earlier layer"):
        composition_score(tiny.head(1, 0), tiny.head(1, 1), "V")
