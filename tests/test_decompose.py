"""Decomposition, accumulated residual, logit lens and direct logit attribution: every
part sums to the whole, and the whole matches HF transformers and TransformerLens."""

import warnings

import pytest
import torch
from einops import rearrange
from test_transformer_lens import bridge_for

from resid.core.decompose import decomposition_hooks

SITES = [(layer, where) for layer in range(2) for where in ("pre", "mid", "post")] + [
    (None, "final")
]


def test_decomposition_sums_to_every_stream(tiny_run):
    _, _, cache = tiny_run
    worst = 0.0
    for layer, where in SITES:
        stream = cache.stream(2 if layer is None else layer, where)
        for kwargs in ({}, {"heads": False}, {"per_neuron": True}, {"per_neuron": [0]}):
            parts = stream.decompose(**kwargs)
            assert parts.components.shape[1:] == (3, 17, 64)
            worst = max(worst, (parts.sum() - stream.tensor).abs().max().item())
    assert worst < 1e-5, worst
    parts = cache.decompose_resid(1, "mid")
    assert parts.labels == (
        ["embed", "pos_embed", "L0H0", "L0H1", "L0H2", "L0H3", "L0.b_O", "L0.mlp"]
        + ["L1H0", "L1H1", "L1H2", "L1H3", "L1.b_O"]
    )
    assert torch.equal(parts["embed"], cache["hook_embed"])
    assert torch.equal(parts["L0.mlp"], cache["blocks.0.hook_mlp_out"])
    neurons = cache.decompose_resid(1, "pre", per_neuron=True)
    assert len(neurons) == 2 + 5 + 256 + 1 and neurons.labels[-2:] == ["L0N255", "L0.b_out"]


def test_head_parts_are_the_forwards_per_head_results(tiny, tiny_run):
    """z @ W_O per head (from the cache) == hook_result, which the forward computes when
    hooked; with it cached the decomposition uses it and nothing changes."""
    tokens, _, cache = tiny_run
    with torch.no_grad():
        _, with_result = tiny.run_with_cache(tokens, names_filter=lambda n: True)
    for layer in range(2):
        torch.testing.assert_close(
            cache.head_results(layer), with_result[f"blocks.{layer}.attn.hook_result"], atol=1e-5, rtol=0
        )  # fmt: skip
    torch.testing.assert_close(
        cache.decompose_resid(None).components, with_result.decompose_resid(None).components, atol=1e-5, rtol=0
    )  # fmt: skip
    assert cache.head_results().shape == (2, 3, 17, 4, 64)


def test_missing_hooks_are_named(tiny, tiny_run):
    tokens = tiny_run[0]
    _, streams = tiny.run_with_cache(tokens, names_filter=lambda n: "hook_resid" in n)
    with pytest.raises(KeyError, match=r"hook_embed, hook_pos_embed, blocks.0.attn.hook_z.*decomposition_hooks\(model, 1, 'pre'\)"):  # fmt: skip
        streams.stream(1, "pre").decompose()
    with pytest.raises(KeyError, match="blocks.1.attn.hook_z"):
        streams.head_results(1)
    names = decomposition_hooks(tiny, 1, "pre")
    _, enough = tiny.run_with_cache(tokens, names_filter=names + ["blocks.1.hook_resid_pre"])
    parts = enough.stream(1, "pre").decompose()
    torch.testing.assert_close(parts.sum(), enough["blocks.1.hook_resid_pre"], atol=1e-5, rtol=0)


def test_logit_lens_matches_hf_hidden_states(tiny, tiny_hf, tiny_run):
    """HF's hidden_states[l] is resid_pre of layer l; ln_f of it through the LM head is the
    logit lens. The last entry is the model's logits."""
    tokens, logits, cache = tiny_run
    with torch.no_grad():
        out = tiny_hf(tokens, output_hidden_states=True)
        hf_lens = [tiny_hf.lm_head(tiny_hf.transformer.ln_f(h)) for h in out.hidden_states[:-1]]
    lens, labels = cache.logit_lens(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    torch.testing.assert_close(lens, torch.stack([*hf_lens, out.logits]), atol=1e-4, rtol=0)
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=0)
    acc = cache.accumulated_resid(1, incl_mid=True, return_labels=True)
    assert acc[1] == ["0_pre", "0_mid", "1_pre"]


def test_logit_attribution_sums_to_the_logit(tiny, tiny_run):
    tokens, logits, cache = tiny_run
    u = torch.randn(64, generator=torch.Generator().manual_seed(5))
    final = cache.final_stream().tensor
    with torch.no_grad():
        along_u = tiny.ln_final(final) @ u
    per_seq = torch.tensor([11, 500, 3000])
    cases = [
        (17, logits[..., 17]),
        ((17, 4242), logits[..., 17] - logits[..., 4242]),
        (u, along_u),
        (per_seq, logits[torch.arange(3), :, per_seq]),
        (torch.tensor([[1, 2], [3, 4], [5, 6]]), logits[torch.arange(3), :, [1, 3, 5]] - logits[torch.arange(3), :, [2, 4, 6]]),
    ]  # fmt: skip
    _, no_scale = tiny.run_with_cache(tokens, names_filter=lambda n: "scale" not in n)
    worst = 0.0
    for target, expected in cases:
        for c, kwargs in ((cache, {}), (cache, {"per_neuron": True}), (no_scale, {"heads": False})):
            dla = c.logit_attribution(target, **kwargs)
            assert dla.labels[-1] == "ln_final.b" and dla.components.shape[1:] == (3, 17)
            worst = max(worst, (dla.sum() - expected).abs().max().item())
    assert worst < 1e-4, worst
    # one part by hand: the token embedding, centred, over the cached scale, times w and W_U[:, t]
    emb = cache["hook_embed"]
    by_hand = ((emb - emb.mean(-1, keepdim=True)) / cache["ln_final.hook_scale"] * tiny.ln_final.w) @ tiny.W_U[:, 17]  # fmt: skip
    torch.testing.assert_close(cache.logit_attribution(17)["embed"], by_hand, atol=1e-5, rtol=0)
    top = cache.logit_attribution(17).top(3, batch=0, pos=-1)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])
    with pytest.raises(ValueError, match=r"direction must be \[d_model=64\]"):
        cache.logit_attribution(torch.randn(32))
    with pytest.raises(ValueError, match=r"id in \[0, 50257\)"):
        cache.logit_attribution(50257)


def tl_results(bridge, tokens):
    bridge.set_use_attn_result(True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tl = bridge.run_with_cache(tokens)
    n = bridge.cfg.n_layers
    heads = torch.stack([tl[f"blocks.{layer}.attn.hook_result"] for layer in range(n)])
    stacked = tl.stack_head_results(layer=-1)  # [layer * head, batch, pos, d_model]
    return tl.accumulated_resid(), tl.accumulated_resid(apply_ln=True), heads, stacked


def compare_with_transformer_lens(model, hf, tokens) -> dict[str, float]:
    """Max |Δ| against TransformerLens, each over resid.io.compare's fp32 tolerance
    (1e-4 + 1e-5 · max |reference|): below 1 means within it. resid's cache holds the
    run model(tokens) made (SDPA), TransformerLens' its own, and Hugging Face's eager and
    sdpa paths differ from each other by about this much too."""
    acc, acc_ln, heads, stacked = tl_results(bridge_for(hf), tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    ours = cache.head_results()  # from hook_z and W_O

    def rel(a, b):
        return ((a - b).abs().max() / (1e-4 + 1e-5 * b.abs().max())).item()

    return {
        "accumulated_resid": rel(cache.accumulated_resid(), acc),
        "accumulated_resid(apply_ln)": rel(cache.accumulated_resid(apply_ln=True), acc_ln),
        "head_results": rel(ours, heads),
        "stack_head_results": rel(rearrange(ours, "l b p h d -> (l h) b p d"), stacked),
        "final decomposition sum": rel(cache.decompose_resid(None).sum(), cache.final_stream().tensor),
    }  # fmt: skip


def test_agrees_with_transformer_lens_tiny(tiny, tiny_hf, tiny_run):
    errors = compare_with_transformer_lens(tiny, tiny_hf, tiny_run[0])
    assert max(errors.values()) < 1, errors


@pytest.mark.slow
def test_agrees_with_transformer_lens_gpt2_small_shapes(small, small_hf):
    tokens = small.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    errors = compare_with_transformer_lens(small, small_hf, tokens)
    assert max(errors.values()) < 1, errors
