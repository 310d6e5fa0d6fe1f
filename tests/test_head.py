"""Head: its weights are the checkpoint's, and its QK/OV circuits reproduce the forward pass."""

import math
import resource
import threading
import time
from pathlib import Path

import pytest
import torch

import resid

SITES = ("ln1.hook_normalized", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z")


def small_vocab_model(seed: int = 0) -> resid.Model:
    torch.manual_seed(seed)
    cfg = resid.Config(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, d_vocab=200, n_ctx=16)
    model = resid.Model(cfg)
    model.init_weights(0.2)
    return model


def test_weights_are_the_checkpoints_and_views_of_the_forwards(tiny, tiny_hf):
    e = tiny.cfg.d_head
    for layer in range(tiny.cfg.n_layers):
        hf = tiny_hf.transformer.h[layer].attn
        W, b = hf.c_attn.weight, hf.c_attn.bias  # Conv1D: [d_model, 3 * d_model], x @ W
        d = tiny.cfg.d_model
        for h in range(tiny.cfg.n_heads):
            head = tiny.head(layer, h)
            cols = slice(h * e, (h + 1) * e)
            for i, (Wx, bx) in enumerate(
                [(head.W_Q, head.b_Q), (head.W_K, head.b_K), (head.W_V, head.b_V)]
            ):
                assert torch.equal(Wx, W[:, i * d :][:, cols]) and torch.equal(bx, b[i * d :][cols])
            assert torch.equal(head.W_O, hf.c_proj.weight[cols])
            assert torch.equal(head.b_O, hf.c_proj.bias)
            fused = tiny.blocks[layer].attn.W_QKV
            for w in (head.W_Q, head.W_K, head.W_V):
                assert w.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    # the stacked copies on the model hold the same numbers
    assert torch.equal(tiny.W_K[1, 2], tiny.head(1, 2).W_K)
    assert torch.equal(tiny.OV[1, 2].AB, tiny.head(1, 2).ov.AB)


@torch.no_grad()
def test_circuits_reproduce_scores_pattern_and_output(tiny, tokens):
    """scores = (x W_Q + b_Q)(x W_K + b_K)ᵀ/√d_head, expanded around QK = W_Q W_Kᵀ, and
    output = pattern (x W_V + b_V) W_O = pattern x OV + b_V W_O, checked on every head."""
    names = [f"blocks.{layer}.{site}" for layer in range(tiny.cfg.n_layers) for site in SITES]
    names += [f"blocks.{layer}.attn.hook_result" for layer in range(tiny.cfg.n_layers)]
    _, cache = tiny.run_with_cache(tokens, names_filter=names)
    pos = tokens.shape[1]
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    worst = {"scores": 0.0, "pattern": 0.0, "result": 0.0, "z @ W_O": 0.0}
    for layer in range(tiny.cfg.n_layers):
        ln1 = tiny.blocks[layer].ln1
        x = cache[f"blocks.{layer}.ln1.hook_normalized"] * ln1.w + ln1.b  # [batch, pos, d_model]
        for h in range(tiny.cfg.n_heads):
            head = tiny.head(layer, h)
            bilinear = (x @ head.qk @ x.mT).AB  # [batch, q, k]
            q_side = (x @ head.W_Q @ head.b_K)[:, :, None]  # x W_Q b_Kᵀ, per query
            k_side = (x @ head.W_K @ head.b_Q)[:, None, :]  # b_Q W_Kᵀ xᵀ, per key
            scores = (bilinear + q_side + k_side + head.b_Q @ head.b_K) / math.sqrt(tiny.cfg.d_head)
            cached = cache[f"blocks.{layer}.attn.hook_attn_scores"][:, h]
            assert torch.isinf(cached[:, ~causal]).all()
            worst["scores"] = max(worst["scores"], (scores - cached)[:, causal].abs().max().item())

            pattern = head.pattern(cache)
            ours = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            worst["pattern"] = max(worst["pattern"], (ours - pattern).abs().max().item())

            output = (pattern @ x @ head.ov).AB + head.b_V @ head.W_O  # [batch, pos, d_model]
            result = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
            z_out = cache[f"blocks.{layer}.attn.hook_z"][:, :, h] @ head.W_O
            worst["result"] = max(worst["result"], (output - result).abs().max().item())
            worst["z @ W_O"] = max(worst["z @ W_O"], (output - z_out).abs().max().item())
    assert max(worst.values()) < 2e-5, worst


def test_full_circuits_equal_their_materialised_products():
    model = small_vocab_model()
    head = model.head(1, 3)
    W_E, W_pos, W_U = model.W_E.double(), model.W_pos.double(), model.W_U.double()
    QK = head.W_Q.double() @ head.W_K.double().T
    OV = head.W_V.double() @ head.W_O.double()
    assert head.full_ov.shape == (200, 200) and head.full_ov.rank == 8
    torch.testing.assert_close(head.full_ov.AB.double(), W_E @ OV @ W_U, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.full_qk.AB.double(), W_E @ QK @ W_E.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.pos_qk.AB.double(), W_pos @ QK @ W_pos.T, rtol=1e-5, atol=1e-6)


def brute_top_k(model, head, sources, k, largest=True):
    """Rows of the full OV circuit built another way (through the materialised d_model²
    OV, in float64), then ranked."""
    OV = head.W_V.double() @ head.W_O.double()
    rows = model.W_E[sources].double() @ OV @ model.W_U.double()
    return rows, rows.topk(k, dim=-1, largest=largest)


@pytest.mark.parametrize("largest", [True, False])
def test_ov_top_k_equals_brute_force(largest):
    model = small_vocab_model()
    head = model.head(0, 2)
    values, tokens = head.ov_top_k(k=5, chunk=37, largest=largest)  # 37 does not divide 200
    rows, ref = brute_top_k(model, head, torch.arange(200), 5, largest)
    assert values.shape == tokens.shape == (200, 5)
    assert torch.equal(tokens, ref.indices)
    torch.testing.assert_close(values.double(), ref.values, rtol=1e-5, atol=1e-6)
    some = torch.tensor([7, 199, 0, 7])
    v, t = head.ov_top_k(k=3, sources=some, chunk=2, largest=largest)
    assert torch.equal(t, tokens[some, :3])
    torch.testing.assert_close(v, values[some, :3])  # chunks round differently: not bit-equal


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="samples RSS from /proc")
def test_full_ov_top_k_on_gpt2_small_shapes_in_bounded_memory(small):
    """All 50257 source tokens × 50257 outputs (the materialised matrix would be 10 GB):
    resident memory, sampled every 5 ms while it runs, grows by < 2 GB
    (by ~chunk × d_vocab × 4 bytes ≈ 100 MB in practice, plus the [50257, k] answer)."""
    head = small.head(5, 7)
    baseline, peak, running = rss_bytes(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        start, cpu = time.perf_counter(), time.process_time()
        values, tokens = head.ov_top_k(k=10, chunk=512)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        running[0] = False
        sampler.join()
    growth = peak[0] - baseline
    print(
        f"full OV top-10, GPT-2 small shapes: {seconds:.1f} s wall, {cpu:.1f} s CPU, "
        f"RSS growth {growth / 2**20:.0f} MiB"
    )
    assert growth < 2 * 2**30
    assert values.shape == tokens.shape == (50257, 10)

    sources = torch.tensor([0, 1, 13, 262, 464, 11_000, 30_000, 50_256])
    rows, ref = brute_top_k(small, head, sources, 10)
    torch.testing.assert_close(values[sources].double(), ref.values, rtol=1e-4, atol=1e-5)
    # the tokens chosen carry the reference's values (robust to near-ties in the ranking)
    torch.testing.assert_close(rows.gather(1, tokens[sources]), ref.values, rtol=1e-4, atol=1e-5)


def test_bad_input_gets_clear_errors(tiny, tokens):
    with pytest.raises(IndexError, match="layer 2 is out of range"):
        tiny.head(2, 0)
    with pytest.raises(IndexError, match="head 4 is out of range"):
        tiny.head(0, 4)
    with pytest.raises(IndexError, match="out of range"):
        tiny.head(-1, 0)
    with pytest.raises(TypeError):
        tiny.head(0.5, 0)
    head = tiny.head(1, 0)
    with pytest.raises(ValueError, match="k must be"):
        head.ov_top_k(k=0)
    with pytest.raises(ValueError, match="source token ids"):
        head.ov_top_k(sources=torch.tensor([50257]))
    with pytest.raises(ValueError, match="chunk"):
        head.ov_top_k(chunk=0)
    _, cache = tiny.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    with pytest.raises(KeyError, match="not cached"):
        head.pattern(cache)
