"""The functional building blocks: seed 003's worked example by hand, and the Model's
forward pass rebuilt from them."""

import math

import numpy as np
import pytest
import torch

from resid.core import functional as Fr

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


# Seed 003's decoder. Its token is SOS with embedding [1, 0, 0, 0] at position 0; the
# weights are random draws it does not print, so what a test can check is each step whose
# inputs it prints.
SOS = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
Z_SELF_ATTENTION = [[2.19334924, 10.61851198, -4.50089666, -2.76366551]]  # MHA(E), printed
Z_SELF_ATTENTION_NORMED = [[0.17236212, 1.54684892, -1.0828824, -0.63632864]]
Z_ENCODER_DECODER = [[1.57651431, 4.92489307, -0.08644448, -0.46776051]]  # printed
ENCODER_OUTPUT = [[-1.5, 1.0, -0.8, 1.5], [1.0, -1.0, -0.5, 1.0]]


def seed_layer_norm(x):
    return Fr.layer_norm(x, eps=1e-6, eps_added_to="std")  # the seed's: / (std + 1e-6)


def test_seed_003_decoder_positional_encoding():
    pe = Fr.sinusoidal_positions(2, 4).double()
    close(pe[0], [0, 1, 0, 1], atol=0)  # sin 0, cos 0, sin 0, cos 0
    close(SOS + pe[0], [[1, 1, 0, 1]], atol=0)  # the decoder's E, as printed
    # position 1 by the paper's formula (dimensions 2i, 2i+1 share 10000^(2i/d)):
    close(pe[1], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)], atol=1e-7)
    # (the seed's encoder writes [0.84, 0.99, 0, 1] here: for dimension 1 it uses
    # 10000^(2·1/4), i.e. the dimension index where the formula it quotes has the pair
    # index; the encoder tests above use its E as printed, so they are unaffected)
    big = Fr.sinusoidal_positions(50, 16).double()
    pos, two_i = torch.arange(50.0)[:, None], torch.arange(0, 16, 2.0)
    close(big[:, 0::2], torch.sin(pos / 10000 ** (two_i / 16)).tolist())
    close(big[:, 1::2], torch.cos(pos / 10000 ** (two_i / 16)).tolist())


def test_seed_003_decoder_self_attention_add_and_norm():
    E = SOS + Fr.sinusoidal_positions(1, 4).double()
    z = torch.tensor(Z_SELF_ATTENTION, dtype=torch.float64)
    close(seed_layer_norm(z + E), Z_SELF_ATTENTION_NORMED, atol=1e-8)


def test_seed_003_encoder_decoder_step_does_not_follow_from_its_printed_inputs():
    """The seed prints Z_encoder_decoder = [1.57651431, 4.92489307, -0.08644448, -0.46776051]
    and then layer_norm(Z_encoder_decoder + Z_self_attention) = [-0.44406723, 1.6552893,
    -0.19984632, -1.01137575]. From the printed inputs:

        Z_encoder_decoder + Z_self_attention = [1.74887643, 6.47174199, -1.16932688, -1.10408915]
        mean = 1.48680060, population std = 3.10990543
        (x - mean) / (std + 1e-6)           = [0.08427129, 1.60292327, -0.85408598, -0.83310859]

    not the printed row (0.53 off in the first entry). The printed row is a layer norm's
    output (mean 0, std 1) but of another input: the seed's multi_head_*_attention draw a
    fresh random W_O (np.random.randn) inside every call, so a re-run cell printed values
    of a different draw from the ones the next cell used. Likewise its `output =
    layer_norm(feed_forward(...) + Z_encoder_decoder)` prints [-0.97650182, 0.81470137,
    -2.79122044, -3.39192873], whose mean is -1.586: no layer norm without gain and bias
    outputs that. The decoder's final rows it prints do have mean 0 and std 1."""
    z_ed = torch.tensor(Z_ENCODER_DECODER, dtype=torch.float64)
    z_sa = torch.tensor(Z_SELF_ATTENTION_NORMED, dtype=torch.float64)
    x = z_ed + z_sa
    close(x.mean(), 1.4868006, atol=1e-7)
    close(x.std(correction=0), 3.10990543, atol=1e-7)
    follows = seed_layer_norm(x)
    close(follows, [[0.08427129, 1.60292327, -0.85408598, -0.83310859]], atol=1e-7)
    printed = torch.tensor(
        [[-0.44406723, 1.6552893, -0.19984632, -1.01137575]], dtype=torch.float64
    )
    assert (follows - printed).abs().max() > 0.5
    close(printed.mean(), 0.0, atol=1e-7)  # a layer norm's output, of some other input
    close(printed.std(correction=0), 1.0, atol=1e-6)
    output = torch.tensor([-0.97650182, 0.81470137, -2.79122044, -3.39192873], dtype=torch.float64)
    assert abs(output.mean()) > 1.5  # not a layer norm's output at all
    for row in ([0.25919176, 1.49913566, -1.14331487, -0.61501256],
                [0.25956188, 1.49896896, -1.14336934, -0.61516151]):  # fmt: skip
        row = torch.tensor(row, dtype=torch.float64)
        close(row.mean(), 0.0, atol=1e-7)
        close(row.std(correction=0), 1.0, atol=1e-6)


def seed_decoder_block_numpy(x, memory, sa, ca, W1, b1, W2, b2):
    """Seed 003's decoder_block, as its numpy code has it (with its per-call random W_O
    passed in instead): the plain reference for Fr.decoder_block."""

    def softmax(s):
        return np.exp(s) / np.sum(np.exp(s), axis=1, keepdims=True)

    def ln(v, epsilon=1e-6):
        return (v - v.mean(axis=-1, keepdims=True)) / (v.std(axis=-1, keepdims=True) + epsilon)

    def heads(q_in, kv_in, W):
        out = []
        for WQ, WK, WV in zip(W.W_Q.numpy(), W.W_K.numpy(), W.W_V.numpy(), strict=True):
            Q, K, V = q_in @ WQ, kv_in @ WK, kv_in @ WV
            out.append(softmax(Q @ K.T / np.sqrt(WK.shape[1])) @ V)
        return np.concatenate(out, axis=1) @ W.W_O.numpy().reshape(-1, q_in.shape[1])

    Z = ln(heads(x, x, sa) + x)
    Z_ed = ln(heads(Z, memory, ca) + Z)
    ff = np.maximum(Z_ed @ W1 + b1, 0) @ W2 + b2
    return ln(ff + Z_ed)


def test_decoder_block_is_the_seeds_decoder_block():
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def weights():  # 2 heads, d_model 4, d_head 3, as in the seed
        return Fr.AttentionWeights(randn(2, 4, 3), randn(2, 4, 3), randn(2, 4, 3), randn(2, 3, 4))

    sa, ca = weights(), weights()
    W1, b1, W2, b2 = randn(4, 8), randn(8), randn(8, 4), randn(4)
    memory = torch.tensor(ENCODER_OUTPUT, dtype=torch.float64)
    for x in (SOS + Fr.sinusoidal_positions(1, 4).double(), E):  # one position; two
        # the seed's decoder skips the mask ("We'll skip this for now")
        ours = Fr.decoder_block(
            x, memory, sa, ca, W1, b1, W2, b2, norm=seed_layer_norm, causal=False
        )
        ref = seed_decoder_block_numpy(*(t.numpy() for t in (x, memory)), sa, ca,
                                       *(t.numpy() for t in (W1, b1, W2, b2)))  # fmt: skip
        close(ours, ref.tolist(), atol=1e-12)
        assert ours.shape == x.shape  # one row per decoder position, whatever memory's length
        close(ours.mean(-1), [0.0] * len(x), atol=1e-12)  # ends in a layer norm
    # masked: the first position cannot see the second, so it equals its run alone
    one = Fr.decoder_block(E[:1], memory, sa, ca, W1, b1, W2, b2)
    two = Fr.decoder_block(E, memory, sa, ca, W1, b1, W2, b2)
    torch.testing.assert_close(two[:1], one)


def test_cross_attention_reads_keys_and_values_from_memory():
    g = torch.Generator().manual_seed(0)
    x, memory = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    W_Q, W_K, W_V = (torch.randn(4, 3, generator=g) for _ in range(3))
    out = Fr.cross_attention(x, memory, W_Q, W_K, W_V)
    # by hand: each query's softmax over every memory position, then a mix of memory's values
    for b in range(2):
        for i in range(3):
            s = torch.stack([(x[b, i] @ W_Q) @ (memory[b, j] @ W_K) / 3**0.5 for j in range(5)])
            mix = sum(w * (memory[b, j] @ W_V) for j, w in enumerate(s.softmax(0)))
            torch.testing.assert_close(out[b, i], mix)
    # one memory position: every query gets its value, whatever the query
    torch.testing.assert_close(
        Fr.cross_attention(x, memory[:, :1], W_Q, W_K, W_V),
        (memory[:, :1] @ W_V).expand(2, 3, 3),
    )
    # memory = x: unmasked self-attention
    torch.testing.assert_close(
        Fr.cross_attention(x, x, W_Q, W_K, W_V), Fr.attention(x, W_Q, W_K, W_V, causal=False)
    )
    W_O = torch.randn(2, 3, 4, generator=g)
    heads = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    multi = Fr.multi_head_cross_attention(x, memory, *heads, W_O)
    by_head = sum(Fr.cross_attention(x, memory, *(w[h] for w in heads)) @ W_O[h] for h in range(2))
    torch.testing.assert_close(multi, by_head)
