"""ResidualStream and State: labelled sites, query = dot product, update = a new stream,
edits during a run; and a cache that computes and stores only what is asked."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import resid
from resid.core.stream import ResidualStream


def test_streams_carry_their_site(tiny, tiny_run):
    _, _, cache = tiny_run
    for layer in range(2):
        for where in ("pre", "mid", "post"):
            stream = cache.stream(layer, where)
            assert stream.site == f"blocks.{layer}.hook_resid_{where}"
            assert (stream.layer, stream.where) == (layer, where)
            assert stream.tensor is cache[stream.site]
    assert cache.stream(-1, "mid").site == "blocks.1.hook_resid_mid"
    final = cache.final_stream()
    assert (final.site, final.layer, final.where) == ("blocks.1.hook_resid_post", 2, "final")
    assert cache.stream(2, "pre").where == "final"  # TransformerLens' layer = n_layers
    # the final stream is what ln_final reads: the model's own head on it gives the logits
    torch.testing.assert_close(tiny.ln_final(final.tensor) @ tiny.W_U, tiny_run[1])


def test_query_is_the_dot_product(tiny_run):
    _, _, cache = tiny_run
    stream = cache.stream(1, "pre")
    x = stream.tensor
    g = torch.Generator().manual_seed(0)
    v, V = torch.randn(64, generator=g), torch.randn(64, 5, generator=g)
    by_hand = (x * v).sum(-1)
    torch.testing.assert_close(stream.query(v), by_hand, atol=1e-5, rtol=0)
    out = stream.query(V)
    assert out.shape == (3, 17, 5)
    for k in range(5):
        torch.testing.assert_close(out[..., k], (x * V[:, k]).sum(-1), atol=1e-5, rtol=0)
    state = stream.states[2, 4]
    assert isinstance(state.query(v), float)
    assert state.query(v) == pytest.approx(sum(a * b for a, b in zip(x[2, 4].tolist(), v.tolist(), strict=True)), abs=1e-4)  # fmt: skip
    torch.testing.assert_close(state.query(V), out[2, 4])


def test_states_index_positions(tiny_run):
    _, _, cache = tiny_run
    one = ResidualStream(cache["blocks.0.hook_resid_mid"][1:2], "blocks.0.hook_resid_mid")
    assert len(one.states) == 17
    assert torch.equal(one.states[2].vector, cache["blocks.0.hook_resid_mid"][1, 2])
    assert one.states[-1].pos == 16 and one.states[2].site == "blocks.0.hook_resid_mid"
    assert [s.pos for s in one.states] == list(range(17))
    batch = cache.stream(0, "mid")
    assert torch.equal(batch.states[1, 2].vector, one.states[2].vector)
    with pytest.raises(IndexError, match=r"batch of 3: index states\[b, pos\]"):
        batch.states[2]
    with pytest.raises(IndexError, match="pos index 17 is out of range"):
        batch.states[0, 17]


def test_update_returns_a_new_stream(tiny_run):
    _, _, cache = tiny_run
    stream = cache.stream(1, "mid")
    before = stream.tensor.clone()
    v = torch.randn(64)
    v_before = v.clone()
    for delta, expected in [
        (v, before + v),
        (v.expand(3, 17, 64).clone(), before + v),
        (v[None].expand(17, 64).clone(), before + v),
    ]:
        new = stream.update(delta)
        assert isinstance(new, ResidualStream) and new.site == stream.site
        assert torch.equal(new.tensor, expected)
    assert torch.equal(stream.tensor, before) and torch.equal(v, v_before)
    state = stream.states[0, 3]
    assert torch.equal(state.update(v).vector, before[0, 3] + v)
    assert torch.equal(state.vector, before[0, 3])
    # an updated stream still decomposes: the update is one more named part
    parts = stream.update(v, label="steer").update(2 * v).decompose()
    assert parts.labels[-2:] == ["steer", "update_1"]
    torch.testing.assert_close(parts.sum(), before + 3 * v, atol=1e-5, rtol=0)


def test_update_in_a_hook_changes_logits_like_adding_by_hand(tiny, tiny_run):
    """``add`` at blocks.l.hook_resid_pre == resuming the forward at layer l from the cached
    stream with v added (``start_at_layer``), for every layer, all or some positions."""
    tokens, logits, cache = tiny_run
    v = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 3
    worst = 0.0
    with torch.no_grad():
        for layer in range(2):
            site = f"blocks.{layer}.hook_resid_pre"
            stream = cache.stream(layer, "pre")
            by_hand = tiny(stream.update(v).tensor, start_at_layer=layer)
            with tiny.hooks([resid.core.stream.add(site, v)]):
                hooked = tiny(tokens)
            in_hook = lambda act, hook: ResidualStream(act, hook.name).update(v).tensor  # noqa: E731
            also = tiny.run_with_hooks(tokens, fwd_hooks=[(site, in_hook)])
            for got in (hooked, also):
                worst = max(worst, (got - by_hand).abs().max().item())
            assert (hooked - logits).abs().max() > 0.1
            only_last = torch.zeros(3, 17, 64)
            only_last[:, -1] = v
            by_hand = tiny(stream.update(only_last).tensor, start_at_layer=layer)
            hooked = tiny.run_with_hooks(tokens, fwd_hooks=[resid.core.stream.add(site, v, pos=-1)])
            worst = max(worst, (hooked - by_hand).abs().max().item())
            torch.testing.assert_close(hooked[:, :-1], logits[:, :-1], atol=1e-5, rtol=0)
    assert worst < 1e-5, worst
    assert not any(hp.fns for hp in tiny.hook_dict.values())


def test_bad_input_gets_clear_errors(tiny, tiny_run):
    _, _, cache = tiny_run
    stream = cache.stream(0, "post")
    with pytest.raises(ValueError, match=r"d_model=64\] or \[d_model, k\], got \(65,\)"):
        stream.query(torch.randn(65))
    with pytest.raises(ValueError, match=r"pass v.T"):
        stream.query(torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"broadcastable to \(3, 17, 64\), got \(32,\)"):
        stream.update(torch.randn(32))
    with pytest.raises(ValueError, match=r"got \(5, 17, 64\)"):
        stream.update(torch.randn(5, 17, 64))
    with pytest.raises(TypeError, match="float tensor"):
        stream.query(torch.arange(64))
    with pytest.raises(ValueError, match="where must be 'pre', 'mid', 'post' or 'final'"):
        cache.stream(0, "middle")
    with pytest.raises(ValueError, match="layer 5 is out of range: this model has 2 layers"):
        cache.stream(5, "pre")
    with pytest.raises(ValueError, match="must name a residual stream hook"):
        ResidualStream(stream.tensor, "blocks.0.hook_mlp_out")
    alone = ResidualStream(stream.tensor, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="built from a tensor, not a cache"):
        alone.decompose()
    with pytest.raises(ValueError, match="the add hook on 'blocks.1.hook_resid_mid'"):
        tiny.run_with_hooks(tiny_run[0], fwd_hooks=[resid.core.stream.add("blocks.1.hook_resid_mid", torch.ones(8))])  # fmt: skip
    assert not any(hp.fns for hp in tiny.hook_dict.values())


def test_cache_of_streams_stores_and_computes_only_those(tiny, tiny_run):
    """Bytes held are exactly the streams asked for, and attention stays on its fused
    kernel: no explicit softmax runs (it does as soon as a pattern is asked for)."""
    tokens, logits, _ = tiny_run
    streams = [f"blocks.{i}.hook_resid_{w}" for i in range(2) for w in ("pre", "mid", "post")]

    def ops(names_filter):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out, cache = tiny.run_with_cache(tokens, names_filter=names_filter)
        return out, cache, {e.name for e in prof.events()}

    out, cache, names = ops(lambda n: "hook_resid" in n)
    assert sorted(cache) == sorted(streams)
    assert cache.nbytes == len(streams) * 3 * 17 * 64 * 4
    assert names & {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"}  # fmt: skip
    assert not names & {"aten::softmax", "aten::_softmax"}
    torch.testing.assert_close(out, logits)
    _, _, names = ops(["blocks.1.attn.hook_pattern"])  # the check can see a softmax
    assert names & {"aten::softmax", "aten::_softmax"}


def test_cache_device_and_dtype(tiny, tiny_run):
    tokens, _, full = tiny_run
    _, half = tiny.run_with_cache(tokens, names_filter=lambda n: "resid" in n, dtype=torch.bfloat16)
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    assert half.nbytes == 6 * 3 * 17 * 64 * 2
    for name, t in half.items():
        torch.testing.assert_close(t.float(), full[name], atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="meta device"):
        tiny.run_with_cache(tokens, device="meta")
    with pytest.raises(TypeError, match="float dtype"):
        tiny.run_with_cache(tokens, dtype=torch.int64)
