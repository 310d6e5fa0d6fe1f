"""The functional building blocks: seed 003's worked example by hand, and the Model's
forward pass rebuilt from them."""

import pytest
import torch

from resid import functional as Fr

# Seed 003 (shared/seeds/003_*.txt), as its numpy code has them (where its LaTeX differs
# for W_Q1 and W_K2, the numpy code produced the printed numbers).
E = torch.tensor(
    [[1, 3, 3, 5], [2.84, 3.99, 4, 6]], dtype=torch.float64
)  # as printed, rounded by hand
W_K1 = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64)
W_V1 = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64)
W_Q1 = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
W_K2 = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float64)
W_V2 = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
W_Q2 = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.float64)
W = torch.tensor(
    [
        [0.79445237, 0.1081456, 0.27411536, 0.78394531],
        [0.29081936, -0.36187258, -0.32312791, -0.48530339],
        [-0.36702934, -0.76471963, -0.88058366, -1.73713022],
        [-0.02305587, -0.64315981, -0.68306653, -1.25393866],
        [0.29077448, -0.04121674, 0.01509932, 0.13149906],
        [0.57451867, -0.08895355, 0.02190485, 0.24535932],
    ],
    dtype=torch.float64,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0
    )


def test_seed_003_keys_and_scores():
    close(E @ W_K1, [[4, 8, 4], [6.84, 9.99, 6.84]])
    close(E @ W_V1, [[6, 6, 4], [7.99, 8.84, 6.84]])
    close(E @ W_Q1, [[8, 3, 3], [9.99, 3.99, 4]])
    close((E @ W_Q1) @ (E @ W_K1).T, [[68, 105.21], [87.88, 135.5517]])
    # the encoder's attention sees every position (causal=False); 1/√3 first, then 1/30
    close(Fr.attention(E, W_Q1, W_K1, W_V1, causal=False), [[7.99, 8.84, 6.84]] * 2, atol=1e-8)
    close(Fr.attention(E, W_Q1, W_K1, W_V1, scale=1 / 30, causal=False),
          [[7.54348784, 8.20276657, 6.20276657], [7.65266185, 8.35857269, 6.35857269]])  # fmt: skip
    close(Fr.attention(E, W_Q2, W_K2, W_V2, scale=1 / 30, causal=False),
          [[8.45589591, 3.85610456, 7.72085664], [8.63740591, 3.91937741, 7.84804146]])  # fmt: skip


def test_seed_003_multi_head_and_layer_norm():
    W_Q, W_K, W_V = (torch.stack(p) for p in ((W_Q1, W_Q2), (W_K1, W_K2), (W_V1, W_V2)))
    W_O = W.reshape(2, 3, 4)  # concatenation then W == per-head blocks of W's rows
    Z = Fr.multi_head_attention(E, W_Q, W_K, W_V, W_O, scale=1 / 30, causal=False)
    close(Z, [[11.46394285, -13.18016471, -11.59340253, -17.04387829],
              [11.62608573, -13.47454936, -11.87126395, -17.4926367]])  # fmt: skip
    # the seed's layer_norm: (x - mean) / (std + 1e-6), population std
    close(Fr.layer_norm(Z + E, eps=1e-6, eps_added_to="std"),
          [[1.71887693, -0.56365339, -0.40370747, -0.75151608],
           [1.71909039, -0.56050453, -0.40695381, -0.75163205]])  # fmt: skip
    # by hand, the seed's μ₁ and σ₁
    close((Z + E)[0].mean(), -4.58837568, atol=1e-7)
    close((Z + E)[0].std(correction=0), 9.9206152789297, atol=1e-7)


def test_feed_forward_is_neurons_reading_and_writing():
    g = torch.Generator().manual_seed(0)
    x, W_in, b_in = (
        torch.randn(5, 4, generator=g),
        torch.randn(4, 8, generator=g),
        torch.randn(8, generator=g),
    )
    W_out, b_out = torch.randn(8, 4, generator=g), torch.randn(4, generator=g)
    relu = torch.relu
    by_neuron = sum(relu(x @ W_in[:, i] + b_in[i])[:, None] * W_out[i] for i in range(8)) + b_out
    torch.testing.assert_close(Fr.feed_forward(x, W_in, b_in, W_out, b_out, act=relu), by_neuron)


def test_model_forward_rebuilt_from_the_blocks(tiny, tokens):
    """GPT-2 = embed; per block, x += MHA(LN(x)) + b_O, x += FFN(LN(x)); LN; @ W_U."""
    with torch.no_grad():
        x = tiny.W_E[tokens] + tiny.W_pos[: tokens.shape[1]]
        for blk in tiny.blocks:
            a = blk.attn
            h = Fr.layer_norm(x, 1e-5, blk.ln1.w, blk.ln1.b)
            # biases of q, k, v: append a constant-1 feature so each head stays x @ W
            h1 = torch.cat([h, torch.ones_like(h[..., :1])], -1)
            W_Q, W_K, W_V = (torch.cat([W, bias[:, None]], 1) for W, bias in
                             ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V)))  # fmt: skip
            x = x + Fr.multi_head_attention(h1, W_Q, W_K, W_V, a.W_O) + a.b_O
            h = Fr.layer_norm(x, 1e-5, blk.ln2.w, blk.ln2.b)
            x = x + Fr.feed_forward(h, blk.mlp.W_in, blk.mlp.b_in, blk.mlp.W_out, blk.mlp.b_out)
        logits = Fr.layer_norm(x, 1e-5, tiny.ln_final.w, tiny.ln_final.b) @ tiny.W_U
        torch.testing.assert_close(tiny(tokens), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_pattern_rows_sum_to_one(causal):
    q, k = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    p = Fr.attention_pattern(q, k, causal=causal)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))
    assert (p[:, 0, 1:] == 0).all() == causal
