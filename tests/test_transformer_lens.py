"""Every hook site resid shares with TransformerLens' TransformerBridge, on the same weights."""

import warnings

import pytest
import torch
from transformers import GPT2LMHeadModel

import resid
from resid.io.references import transformer_lens_bridge

transformer_lens = pytest.importorskip("transformer_lens")


def bridge_for(hf: GPT2LMHeadModel):
    return transformer_lens_bridge(hf, "cpu")


def assert_sites_match(model: resid.Model, bridge, tokens, atol: float) -> dict[str, float]:
    """Every shared site within ``atol + 1e-5 · max |reference|`` (resid.io.compare's fp32
    tolerance); returns each site's max |Δ| over that bound. resid's activations come from
    its SDPA forward, TransformerLens' from an explicit softmax: the two round differently,
    as Hugging Face's own eager and sdpa paths do (6.8e-5 apart at GPT-2-small shapes)."""
    shared = [
        n for n in model.hook_names if n in bridge.hook_dict and not n.endswith("hook_result")
    ]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl_logits, tl = bridge.run_with_cache(tokens, names_filter=lambda n: n in shared)
        logits, ours = model.run_with_cache(tokens, names_filter=shared)
    assert set(tl) >= set(shared) and len(shared) == 4 + 17 * model.cfg.n_layers
    worst = {}
    for name in shared:
        a, b = ours[name], tl[name]
        assert a.shape == b.shape, name
        masked = b < -1e30  # TransformerLens masks scores with -inf or the float minimum
        assert torch.equal(a == float("-inf"), masked), name
        scale = b[~masked].abs().max().item()
        worst[name] = (a[~masked] - b[~masked]).abs().max().item() / (atol + 1e-5 * scale)
    bad = {n: d for n, d in worst.items() if d > 1}
    assert not bad, bad
    torch.testing.assert_close(logits, tl_logits, atol=atol, rtol=0)
    return worst


def test_every_shared_site_matches_tiny(tiny, tiny_hf, tokens):
    assert_sites_match(tiny, bridge_for(tiny_hf), tokens, atol=1e-4)


@pytest.mark.slow
def test_every_shared_site_matches_gpt2_small_shapes(small, small_hf):
    """12 layers of scaled-up random weights amplify float32 rounding: the activations
    there reach |x| ~ 30."""
    tokens = small.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    assert_sites_match(small, bridge_for(small_hf), tokens, atol=1e-4)
