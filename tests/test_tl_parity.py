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
    assert not any(k.endswith(("attn_in", "_input", "mlp_in", "hook_tokens")) for k in cache)
    _, named = tiny.run_with_cache(tokens, names_filter=["blocks.0.hook_mlp_in"])
    assert torch.equal(named["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])


# ---- cache helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_caches(tiny, tiny_hf):
    """(resid's cache, TransformerLens' cache) of the same run on the same weights."""
    pytest.importorskip("transformer_lens")
    from resid.io.references import transformer_lens_bridge

    bridge = transformer_lens_bridge(tiny_hf)
    bridge.set_use_attn_result(True)
    tokens = tiny.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs = bridge.run_with_cache(tokens)
        _, ours = tiny.run_with_cache(tokens)
    return ours, theirs


def close(a, b) -> float:
    """|Δ| over resid.io.compare's fp32 tolerance (1e-4 + 1e-5 max |b|): below 1 is within."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / (1e-4 + 1e-5 * b.abs().max())).item()


def test_short_keys_as_transformer_lens(both_caches):
    ours, theirs = both_caches
    for key in [("pattern", 1), ("resid_pre", -1), ("q", 0, "attn"), ("scale", 1, "ln1"),
                ("normalized", 0, "ln2"), ("post", 1), "embed", ("resid_post", 1), ("z", -2)]:  # fmt: skip
        assert close(ours[key], theirs[key]) < 1, key
    assert torch.equal(ours["pattern", 1], ours["blocks.1.attn.hook_pattern"])
    assert ("pattern", 0) in ours and ("nothing", 0) not in ours and "resid_pre" not in ours


@pytest.mark.parametrize("apply_ln", [False, True])
def test_stacks_equal_transformer_lens(both_caches, apply_ln):
    ours, theirs = both_caches
    kw = dict(return_labels=True, apply_ln=apply_ln)
    cases = {
        "heads": (ours.stack_head_results(-1, pos_slice=-1, incl_remainder=True, **kw),
                  theirs.stack_head_results(-1, pos_slice=-1, incl_remainder=True, **kw)),
        "heads into 1": (ours.stack_head_results(1, **kw), theirs.stack_head_results(1, **kw)),
        "neurons": (ours.stack_neuron_results(2, pos_slice=(2, 6), neuron_slice=(0, 10), **kw),
                    theirs.stack_neuron_results(2, pos_slice=(2, 6), neuron_slice=(0, 10), **kw)),
        "accumulated": (ours.accumulated_resid(None, incl_mid=True, **kw),
                        theirs.accumulated_resid(None, incl_mid=True, **kw)),
        "accumulated into 1": (ours.accumulated_resid(1, mlp_input=True, **kw),
                               theirs.accumulated_resid(1, mlp_input=True, **kw)),
    }  # fmt: skip
    for expand in (True, False):
        for layer, mlp_input in ((None, False), (1, True), (1, False), (0, False)):
            args = dict(layer=layer, mlp_input=mlp_input, expand_neurons=expand, **kw)
            cases[f"full {args}"] = (
                ours.get_full_resid_decomposition(**args),
                theirs.get_full_resid_decomposition(**args),
            )
    for name, ((a, la), (b, lb)) in cases.items():
        assert la == lb, name
        assert close(a, b) < 1, name


def test_stack_laws_and_labelled(both_caches, tiny):
    ours, _ = both_caches
    final = ours["resid_post", -1]
    for expand in (True, False):
        parts = ours.get_full_resid_decomposition(expand_neurons=expand)
        assert parts.axes == ("component", "batch", "pos", "d_model")
        torch.testing.assert_close(parts.sum(), final, atol=1e-4, rtol=0)
        into = ours.get_full_resid_decomposition(1, mlp_input=True, expand_neurons=expand)
        torch.testing.assert_close(into.sum(), ours["resid_mid", 1], atol=1e-4, rtol=0)
    # applying the norm's scale to every part sums to the normalised stream (before the gain)
    scaled = ours.get_full_resid_decomposition(1, apply_ln=True, expand_neurons=False)
    torch.testing.assert_close(scaled.sum(), ours["normalized", 1, "ln1"], atol=1e-4, rtol=0)
    heads = ours.stack_head_results(pos_slice=-1)
    assert heads.axes == ("component", "batch", "d_model") and heads.labels[5] == "L1H1"
    assert torch.equal(heads["L1H1"], ours.head_results(1)[:, -1, 1])
    pattern = ours.stack_activation("pattern")
    assert pattern.axes[0] == "layer" and torch.equal(pattern.values[1], ours["pattern", 1])
    neurons = ours.stack_neuron_results(1, neuron_slice=[3, 7])
    assert neurons.labels == ["L0N3", "L0N7"]
    want = ours["post", 0][..., 3, None] * tiny.blocks[0].mlp.W_out[3].detach()
    torch.testing.assert_close(neurons["L0N3"], want)


def test_slices_remove_batch_dim_and_to(tiny, tokens):
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
        _, sliced = tiny.run_with_cache(tokens, pos_slice=(2, 5), batch_slice=[0, 2])
    assert sliced["resid_pre", 1].shape == (2, 3, 64)
    assert torch.equal(sliced["resid_pre", 1], cache["resid_pre", 1][[0, 2], 2:5])
    assert torch.equal(sliced["pattern", 0], cache["pattern", 0][[0, 2], :, 2:5])
    assert torch.equal(sliced["q", 1], cache["q", 1][[0, 2], 2:5])
    one = cache.apply_slice_to_batch_dim((1, 2)).remove_batch_dim()
    assert not one.has_batch_dim and one["resid_pre", 0].shape == (17, 64)
    assert torch.equal(one["scale", 0, "ln1"], cache["scale", 0, "ln1"][1])
    last = cache.apply_slice_to_pos_dim(-1)
    assert last["resid_post", 1].shape == (3, 64) and last["pattern", 1].shape == (3, 4, 17)
    with pytest.raises(ValueError, match="batch of one"):
        cache.remove_batch_dim()
    moved = cache.to("cpu")
    assert moved is not cache and torch.equal(moved["embed"], cache["embed"])


# ---- model conveniences ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tl_bridge(tiny_hf):
    pytest.importorskip("transformer_lens")
    from resid.io.references import transformer_lens_bridge

    return transformer_lens_bridge(tiny_hf)


TEXT = "When Mary and John went to the store, John gave a drink to Mary"


def test_token_conveniences_equal_transformer_lens(tiny, tl_bridge):
    b = tl_bridge
    assert tiny.to_single_str_token(50256) == b.to_single_str_token(50256) == "<|endoftext|>"
    assert tiny.to_single_str_token(torch.tensor(3290)) == b.to_single_str_token(3290)
    for token in (" Mary", " John", tiny.to_single_token(" store")):
        for mode in ("first", "last"):
            assert tiny.get_token_position(token, TEXT, mode=mode) == b.get_token_position(token, TEXT, mode=mode)  # fmt: skip
    assert tiny.get_token_position(" Mary", TEXT, prepend_bos=False) == b.get_token_position(" Mary", TEXT, prepend_bos=False)  # fmt: skip
    assert tiny.all_head_labels == b.all_head_labels == tiny.all_head_labels()  # both spellings
    ids = tiny.to_tokens(TEXT)[0, 1:4]
    for tokens in (" Mary", 3290, ids, ids[None]):
        ours, theirs = (
            tiny.tokens_to_residual_directions(tokens),
            b.tokens_to_residual_directions(tokens),
        )
        assert ours.shape == theirs.shape and torch.equal(ours, theirs.to(ours))
    for layer, mlp_input in ((0, False), (1, True), (2, False)):
        theirs = b.accumulated_bias(layer, mlp_input=mlp_input)
        torch.testing.assert_close(tiny.accumulated_bias(layer, mlp_input=mlp_input), theirs)
    long = " one" * 80
    assert torch.equal(tiny.to_tokens(long, truncate=True), b.to_tokens(long, truncate=True))
    assert tiny.to_tokens(long, truncate=True).shape == (1, tiny.cfg.n_ctx)
    with pytest.raises(ValueError, match="does not occur"):
        tiny.get_token_position(" Paris", TEXT)


def test_get_token_position_in_a_padded_batch(tiny):
    texts = ["Hi Mary", "When Mary and John met Mary"]
    for side in ("left", "right"):
        tokens, mask = tiny.to_tokens(texts, padding_side=side, return_attention_mask=True)
        for mode in ("first", "last"):
            got = tiny.get_token_position(" Mary", tokens, mode=mode, attention_mask=mask)
            for row, text in enumerate(texts):  # each row's position, shifted by its padding
                alone = tiny.get_token_position(" Mary", text, mode=mode)
                pad = int((~mask[row]).sum()) if side == "left" else 0
                assert int(got[row]) == alone + pad


def test_forward_prepend_bos_padding_side_and_layers(tiny, tl_bridge, tokens):
    with torch.no_grad():
        ours = tiny(TEXT, prepend_bos=False)
        assert torch.equal(ours, tiny(tiny.to_tokens(TEXT, prepend_bos=False)))
        theirs = tl_bridge(TEXT, prepend_bos=False)
        assert (ours - theirs).abs().max() < 1e-4
        left = tiny(["Hi", TEXT], padding_side="left")
        assert torch.equal(left[1], tiny(TEXT)[0]) or (left[1] - tiny(TEXT)[0]).abs().max() < 1e-5
        # start from a layer's stream, with the run's tokens for the loss: the same loss
        resid = tiny(tokens, stop_at_layer=1)
        loss = tiny(resid, start_at_layer=1, tokens=tokens, return_type="loss")
        assert torch.equal(loss, tiny(tokens, return_type="loss"))
    with pytest.raises(ValueError, match="needs tokens: pass tokens="):
        tiny(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="not a loss"):
        tiny(tokens, stop_at_layer=1, return_type="loss")


def test_kv_cache_freeze(tiny):
    from resid.core.kv_cache import KVCache

    prefix = tiny.to_tokens("When Mary and John went to the store,")
    a, b = (
        tiny.to_tokens(" John gave", prepend_bos=False),
        tiny.to_tokens(" a drink", prepend_bos=False),
    )
    cache = KVCache(tiny)
    with torch.no_grad():
        tiny(prefix, past_kv_cache=cache)
        cache.freeze()
        got_a = tiny(a, past_kv_cache=cache)
        got_b = tiny(b, past_kv_cache=cache)  # reads the prefix only, not " John gave"
        assert cache.length == prefix.shape[1]
        full_a = tiny(torch.cat([prefix, a], 1))[:, -a.shape[1] :]
        full_b = tiny(torch.cat([prefix, b], 1))[:, -b.shape[1] :]
        cache.unfreeze()
        tiny(a, past_kv_cache=cache)
    assert (got_a - full_a).abs().max() < 1e-4 and (got_b - full_b).abs().max() < 1e-4
    assert cache.length == prefix.shape[1] + a.shape[1]


# ---- the migration page ----------------------------------------------------------------

PAGE = __import__("pathlib").Path(__file__).parents[1] / "docs" / "from_transformerlens.md"


def page_examples() -> list[str]:
    """The middle column of every table row of docs/from_transformerlens.md."""
    rows = []
    for line in PAGE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not line.startswith("| ") or cells[0] in ("TransformerLens", "---"):
            continue
        if cells[0].startswith("TransformerLens"):
            continue
        code = cells[1]
        assert code.startswith("`") and code.endswith("`") and code.count("`") == 2, line
        rows.append(code[1:-1])
    return rows


def test_migration_page_examples_run(tiny_dir, tmp_path):
    """Every row's resid call runs, in order, on a tiny GPT-2 (and an SAE beside it)."""
    import resid
    from resid.sae import SAE, SAEConfig

    examples = page_examples()
    assert len(examples) >= 50
    sae = SAE(SAEConfig.from_dict({
        "d_in": 64, "d_sae": 32,
        "metadata": {"hook_name": "blocks.1.hook_resid_pre",
                     "model_from_pretrained_kwargs": {"fold_ln": True}},
    }))  # fmt: skip
    resid.sae.save(sae, tmp_path / "sae")
    first = resid.load(tiny_dir, device="cpu")
    text = "When Mary and John went to the store, John gave a drink to"
    namespace = {
        "resid": resid, "torch": torch, "checkpoint_dir": tiny_dir, "sae_dir": tmp_path / "sae",
        "text": text, "corrupted": first.to_tokens(text.replace("John", "Paul", 1)),
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SAE's basis warning is the point of a row
        for code in examples:
            try:
                exec(code, namespace)
            except Exception as e:  # name the row that failed
                raise AssertionError(f"{code!r} raised {e!r}") from e
    model = namespace["model"]
    # BOS When Mary and John went to the store , John: the second John is position 10
    assert not model.has_hooks() and namespace["last_john"] == 10
    assert namespace["spliced"].shape == namespace["logits"].shape


def test_split_inputs_under_grouped_query_attention():
    """A Llama-shaped model (RMSNorm, rotary, 2 key/value heads for 4 query heads): the new
    sites have their shapes, observing them changes nothing bit for bit, their gradients
    are autograd's, and a copy of the stream given to every input leaves the output as it
    was (to rounding: the per-head path then runs)."""
    import resid

    cfg = resid.Config(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=50,
                       n_ctx=16, normalization="RMS", positional="rotary", gated_mlp=True,
                       n_kv_heads=2, act_fn="silu")  # fmt: skip
    torch.manual_seed(0)
    model = resid.Model(cfg)
    tokens = torch.randint(0, 50, (2, 7))
    sites = ["blocks.1.hook_attn_in", "blocks.1.hook_q_input", "blocks.1.hook_k_input",
             "blocks.1.hook_v_input", "blocks.1.hook_mlp_in"]  # fmt: skip
    with torch.no_grad():
        plain = model(tokens)
        logits, cache = model.run_with_cache(
            tokens, names_filter=[*sites, "blocks.1.hook_resid_pre"]
        )
    assert torch.equal(logits, plain)
    assert cache["blocks.1.hook_q_input"].shape == (2, 7, 4, 16)
    assert cache["blocks.1.hook_k_input"].shape == (2, 7, 2, 16)
    torch.testing.assert_close(cache["blocks.1.hook_attn_in"][:, :, 3], cache["resid_pre", 1])
    acts, grads = {}, {}
    loss = model.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[(n, lambda x, hook: acts.__setitem__(hook.name, x)) for n in sites],
        bwd_hooks=[(n, lambda g, hook: grads.__setitem__(hook.name, g)) for n in sites],
    )
    want = torch.autograd.grad(loss, [acts[n] for n in sites], retain_graph=True)
    loss.backward()
    for n, w in zip(sites, want, strict=True):
        assert torch.equal(grads[n], w), n
    # the sum over heads of attn_in's gradient is resid_pre's share through attention
    assert grads["blocks.1.hook_attn_in"].abs().max() > 0
    with torch.no_grad():
        same = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_k_input", lambda x, hook: x.clone())]
        )
    assert (same - plain).abs().max() < 1e-5


def test_refactor_refused_under_grouped_query_attention():
    import resid

    cfg = resid.Config(n_layers=1, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=50,
                       n_ctx=16, n_kv_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="grouped-query"):
        resid.process_weights(resid.Model(cfg), refactor_factored_attn_matrices=True)
    half = resid.Model(resid.Config(n_layers=1, d_model=16, n_heads=4, d_head=4, d_mlp=32,
                                    d_vocab=50, n_ctx=16)).to(torch.bfloat16)  # fmt: skip
    processed = resid.process_weights(half)
    assert processed.dtype == torch.bfloat16 and processed.cfg.normalization == "LNPre"
    tokens = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        diff = processed(tokens).float().log_softmax(-1) - half(tokens).float().log_softmax(-1)
    assert diff.abs().max() < 0.1  # bf16 rounding of the processed weights
