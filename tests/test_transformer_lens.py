"""Every hook site resid shares with TransformerLens' TransformerBridge, on the same weights."""

import warnings

import pytest
import torch
from transformers import GPT2LMHeadModel

import resid
from resid.io.references import transformer_lens_bridge

transformer_lens = pytest.importorskip("transformer_lens")


# sites TransformerLens builds only once switched on (set_use_split_qkv_input,
# set_use_attn_in, set_use_hook_mlp_in): compared in their own test below
SPLIT_INPUTS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")


def bridge_for(hf: GPT2LMHeadModel):
    return transformer_lens_bridge(hf, "cpu")


def assert_sites_match(model: resid.Model, bridge, tokens, atol: float) -> dict[str, float]:
    """Every shared site within ``atol + 1e-5 · max |reference|`` (resid.io.compare's fp32
    tolerance); returns each site's max |Δ| over that bound. resid's activations come from
    its SDPA forward, TransformerLens' from an explicit softmax: the two round differently,
    as Hugging Face's own eager and sdpa paths do (6.8e-5 apart at GPT-2-small shapes)."""
    shared = [
        n
        for n in model.hook_names
        if n in bridge.hook_dict and not n.endswith(("hook_result", *SPLIT_INPUTS))
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


@pytest.mark.parametrize("switch", ["set_use_split_qkv_input", "set_use_attn_in"])
def test_split_inputs_and_mlp_in_match_and_patch_as_transformer_lens(tiny, tiny_hf, tokens, switch):
    """The per-head inputs of attention and the MLP's input, observed and patched: the
    same values, and the same logits after the same edit of one head's queries (or of its
    whole input)."""
    bridge = bridge_for(tiny_hf)
    getattr(bridge, switch)(True)
    bridge.set_use_hook_mlp_in(True)
    sites = ["hook_attn_in"] if switch == "set_use_attn_in" else ["hook_q_input", "hook_k_input", "hook_v_input"]  # fmt: skip
    names = [f"blocks.{layer}.{s}" for layer in range(2) for s in [*sites, "hook_mlp_in"]]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tl = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
        _, ours = tiny.run_with_cache(tokens, names_filter=names)
    for n in names:
        assert ours[n].shape == tl[n].shape, n
        assert (ours[n] - tl[n]).abs().max() <= 1e-5, n

    push = torch.randn(64, generator=torch.Generator().manual_seed(0))

    def scale_head_2(x, hook):  # LayerNorm undoes a scaling: push head 2's input instead
        x = x.clone()
        x[:, :, 2] += 3.0 * push
        return x

    patched = f"blocks.1.{sites[0]}"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bridge.run_with_hooks(tokens, fwd_hooks=[(patched, scale_head_2)])
        mine = tiny.run_with_hooks(tokens, fwd_hooks=[(patched, scale_head_2)])
        plain = tiny(tokens)
    assert (mine - plain).abs().max() > 1e-2  # the edit matters
    assert (mine - theirs).abs().max() <= 1e-4
