"""TransformerLens' conveniences in resid: persistent and permanent hooks, the new hook
sites, cache helpers and model conveniences, each against TransformerLens on the same
weights or against a law."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from resid.core.hooks import HookPoint

# ---- hooks ---------------------------------------------------------------------------


def test_add_hook_reset_hooks_and_permanent_hooks(tiny, tokens):
    with torch.no_grad():
        plain = tiny(tokens)
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    seen = []
    count = lambda x, hook: seen.append(hook.name)  # noqa: E731
    assert not tiny.has_hooks() and tiny.list_hooks() == []
    tiny.add_hook("blocks.1.hook_resid_pre", zero)
    tiny.add_hook(lambda n: n.endswith("hook_resid_post"), count, is_permanent=True)
    try:
        assert tiny.has_hooks() and tiny.has_hooks(including_permanent=False)
        listed = {(name, d, perm) for name, d, _, perm in tiny.list_hooks()}
        assert listed == {
            ("blocks.1.hook_resid_pre", "fwd", False),
            ("blocks.0.hook_resid_post", "fwd", True),
            ("blocks.1.hook_resid_post", "fwd", True),
        }
        with torch.no_grad():
            first = tiny(tokens)
            # a run_with_hooks or a `with` block leaves hooks added with add_hook in place
            tiny.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: None)])
            second = tiny(tokens)
        assert not torch.equal(first, plain) and torch.equal(first, second)
        assert seen.count("blocks.1.hook_resid_post") == 3
        tiny.reset_hooks()  # the permanent hook stays
        assert [(n, p) for n, _, _, p in tiny.list_hooks()] == [
            ("blocks.0.hook_resid_post", True),
            ("blocks.1.hook_resid_post", True),
        ]
        assert not tiny.has_hooks(including_permanent=False)
        with torch.no_grad():
            assert torch.equal(tiny(tokens), plain)
        assert seen.count("blocks.1.hook_resid_post") == 4
    finally:
        tiny.reset_hooks(including_permanent=True)
    assert tiny.list_hooks() == [] and not tiny.has_hooks()
    with pytest.raises(KeyError, match="no hook point"):
        tiny.add_hook("blocks.9.hook_nothing", zero)
    with pytest.raises(ValueError, match="'fwd' or 'bwd'"):
        tiny.add_hook("hook_embed", zero, dir="both")
    assert tiny.list_hooks() == []


def test_added_hooks_belong_to_their_thread(tiny, tokens):
    """A hook added in another thread never reaches this one, as resid's hooks never do."""
    with torch.no_grad():
        plain = tiny(tokens)
    done = threading.Event()
    out = {}

    def other():
        tiny.add_hook("hook_embed", lambda x, hook: x * 0, is_permanent=True)
        with torch.no_grad():
            out["there"] = tiny(tokens)
        out["listed"] = len(tiny.list_hooks())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    t.join(60)
    assert done.is_set() and out["listed"] == 1
    assert not torch.equal(out["there"], plain)
    assert tiny.list_hooks() == []
    with torch.no_grad():
        assert torch.equal(tiny(tokens), plain)


def test_backward_hooks_return_a_one_tuple_and_speak_of_gradients(tiny, tokens):
    grads = []
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        bwd_hooks=[
            ("blocks.1.hook_resid_pre", lambda g, hook: (torch.zeros_like(g),)),
            ("blocks.0.hook_resid_pre", lambda g, hook: grads.append(g)),
        ],
    )
    loss.backward()
    tiny.zero_grad(set_to_none=True)
    # the gradient into block 1 was replaced by zeros, so nothing reaches block 0 through it
    # but block 0's own path to the loss: compare with the gradient when block 1's is kept
    kept = []
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, h: kept.append(g))],
    )
    loss.backward()
    tiny.zero_grad(set_to_none=True)
    assert grads[0].abs().max() == 0 < kept[0].abs().max()
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: g[0])],
    )
    with pytest.raises(ValueError, match="the gradient there has shape"):
        loss.backward()
    tiny.zero_grad(set_to_none=True)


def test_hook_point_layer(tiny):
    assert tiny.hook_dict["blocks.1.attn.hook_z"].layer() == 1
    assert tiny.hook_dict["blocks.0.hook_q_input"].layer() == 0
    with pytest.raises(ValueError, match="no layer"):
        tiny.hook_dict["hook_embed"].layer()
    assert HookPoint().extra_repr() == "name=''"


def test_hook_tokens_sees_and_swaps_the_ids(tiny, tokens):
    other = (tokens + 1) % tiny.cfg.d_vocab
    with torch.no_grad():
        swapped = tiny.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", lambda t, hook: other)])
        _, cache = tiny.run_with_cache(tokens, names_filter=["hook_tokens"])
        assert torch.equal(swapped, tiny(other))
    assert torch.equal(cache["hook_tokens"], tokens) and cache["hook_tokens"].dtype == torch.long


def test_q_input_of_one_head_reaches_only_its_queries(tiny, tokens):
    """Editing head 2's query input changes head 2's queries and nothing of the keys,
    values or other heads' queries (to fp32 rounding: those are then computed per head)."""
    push = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))

    def edit(x, hook):
        x = x.clone()
        x[:, :, 2] += push
        return x

    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v"]
    with torch.no_grad():
        _, plain = tiny.run_with_cache(tokens, names_filter=names)
        with tiny.hooks([("blocks.0.hook_q_input", edit)]):
            _, edited = tiny.run_with_cache(tokens, names_filter=names)
    q0, q1 = plain["blocks.0.attn.hook_q"], edited["blocks.0.attn.hook_q"]
    assert (q1[:, :, 2] - q0[:, :, 2]).abs().max() > 1e-2
    others = [0, 1, 3]
    assert (q1[:, :, others] - q0[:, :, others]).abs().max() < 1e-5
    for n in names[1:]:
        assert (edited[n] - plain[n]).abs().max() < 1e-5
    # and by hand: head 2's queries from the pushed stream through ln1 and its W_Q
    cache = tiny.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])[1]
    x = cache["blocks.0.hook_resid_pre"] + push
    attn = tiny.blocks[0].attn
    want = tiny.blocks[0].ln1(x) @ attn.W_Q[2] + attn.b_Q[2]
    torch.testing.assert_close(q1[:, :, 2], want.detach(), atol=1e-5, rtol=1e-5)


def test_new_sites_are_named_and_left_out_of_the_default_cache(tiny, tokens):
    import resid

    assert resid.act_name("attn_in", 3) == "blocks.3.hook_attn_in"
    assert resid.act_name("q_input", 0) == "blocks.0.hook_q_input"
    assert resid.act_name("mlp_in", 1) == "blocks.1.hook_mlp_in"
    assert resid.act_name("tokens") == "hook_tokens"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cache = tiny.run_with_cache(tokens)
    assert "blocks.0.hook_mlp_in" in cache
    assert not any(k.endswith(("attn_in", "_input", "hook_tokens")) for k in cache)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])
