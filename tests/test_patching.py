"""Activation patching: every sweep against TransformerLens' ``patching.get_act_patch_*``,
path patching against a one-forward-per-cell version written here, and the laws."""

import warnings
from functools import partial

import pytest
import torch

import resid
from resid import metrics
from resid.interventions.patching import (
    Sweep,
    attribution_patch,
    correlation,
    hook_name,
    patch,
    sweep,
)
from resid.interventions.path_patching import path_patch, path_patch_sweep

tl = pytest.importorskip("transformer_lens")
from transformer_lens import patching as tlp  # noqa: E402

ANSWER, WRONG = torch.tensor([11, 22, 33]), torch.tensor([44, 55, 66])


@pytest.fixture(scope="module")
def prompts():
    """Clean and corrupted prompts that differ at two positions, as in IOI-style tasks."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (3, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, [1, 3]] = torch.randint(0, 50257, (3, 2), generator=g)
    return clean, corrupted


@pytest.fixture(scope="module")
def metric():
    return metrics.logit_diff(ANSWER, WRONG, pos=-1)


@pytest.fixture(scope="module")
def clean_cache(tiny, prompts):
    return tiny.run_with_cache(prompts[0])[1]


@pytest.fixture(scope="module")
def bridge(tiny_hf):
    from resid.io.references import transformer_lens_bridge

    return transformer_lens_bridge(tiny_hf, "cpu")


def no_hooks_left(model) -> bool:
    return all(not hp.fns for hp in model.hook_dict.values())


TL_SWEEPS = {
    ("resid_pre", True): tlp.get_act_patch_resid_pre,
    ("resid_mid", True): tlp.get_act_patch_resid_mid,
    ("resid_post", True): partial(
        tlp.generic_activation_patch,
        patch_setter=tlp.layer_pos_patch_setter,
        activation_name="resid_post",
        index_axis_names=("layer", "pos"),
    ),
    ("attn_out", True): tlp.get_act_patch_attn_out,
    ("mlp_out", True): tlp.get_act_patch_mlp_out,
    ("z", True): tlp.get_act_patch_attn_head_out_by_pos,
    ("z", False): tlp.get_act_patch_attn_head_out_all_pos,
    ("q", True): tlp.get_act_patch_attn_head_q_by_pos,
    ("q", False): tlp.get_act_patch_attn_head_q_all_pos,
    ("k", True): tlp.get_act_patch_attn_head_k_by_pos,
    ("k", False): tlp.get_act_patch_attn_head_k_all_pos,
    ("v", True): tlp.get_act_patch_attn_head_v_by_pos,
    ("v", False): tlp.get_act_patch_attn_head_v_all_pos,
    ("pattern", True): tlp.get_act_patch_attn_head_pattern_by_pos,
    ("pattern", False): tlp.get_act_patch_attn_head_pattern_all_pos,
}


@pytest.mark.parametrize(
    "site,by_pos", list(TL_SWEEPS), ids=[f"{s}-{'pos' if p else 'all'}" for s, p in TL_SWEEPS]
)
def test_sweep_matches_transformer_lens(tiny, bridge, prompts, clean_cache, metric, site, by_pos):
    clean, corrupted = prompts
    plain = lambda logits: metric(logits)  # noqa: E731  (a metric that declares nothing)
    # TransformerLens under no_grad patches in place; with grad on, its bridge's returned
    # hook_resid_mid value reaches the MLP but not the residual sum (measured in 4.3)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, tl_cache = bridge.run_with_cache(clean)
        expected = TL_SWEEPS[site, by_pos](bridge, corrupted, tl_cache, plain)
    declared = sweep(tiny, corrupted, clean_cache, metric, site, by_pos=by_pos, progress=False)
    full = sweep(tiny, corrupted, clean, plain, site, by_pos=by_pos, progress=False)
    assert isinstance(declared, Sweep) and declared.values.shape == expected.shape
    assert (declared.values - expected).abs().max() <= 1e-4
    assert (full.values - expected).abs().max() <= 1e-4
    assert no_hooks_left(tiny)


@pytest.mark.parametrize(
    "site,by_pos",
    [("resid_pre", True), ("mlp_out", True), ("z", True), ("pattern", True), ("v", False)],
)
def test_chunk_size_never_changes_a_value(tiny, prompts, clean_cache, metric, site, by_pos):
    corrupted = prompts[1]
    kl = metrics.kl_to_clean(tiny(prompts[0]), pos=None)  # all positions, all logits
    for m in (metric, kl):
        runs = [
            sweep(
                tiny, corrupted, clean_cache, m, site, by_pos=by_pos, chunk_cells=c, progress=False
            )
            for c in (1, 3, None)
        ]
        assert torch.equal(runs[0].values, runs[1].values)
        assert torch.equal(runs[0].values, runs[2].values)


def test_laws_clean_and_nothing(tiny, prompts, clean_cache, metric):
    clean, corrupted = prompts
    with torch.no_grad():
        clean_value, corrupted_value = metric(tiny(clean)), metric(tiny(corrupted))
    # patching every position of a site with the clean run's own activation: the clean run
    full = patch(tiny, corrupted, "blocks.0.hook_resid_pre", clean_cache, metric=metric)
    torch.testing.assert_close(full, clean_value, atol=1e-5, rtol=0)
    # patching nothing: the corrupted run
    result = sweep(tiny, corrupted, clean_cache, metric, "resid_pre", progress=False)
    assert result.baseline == pytest.approx(corrupted_value.item(), abs=1e-5)
    nothing = patch(tiny, corrupted, "blocks.1.hook_resid_mid", clean_cache, pos=[], metric=metric)
    torch.testing.assert_close(nothing, corrupted_value, atol=1e-5, rtol=0)
    # positions where clean and corrupted agree (0 and 2 at layer 0) are the corrupted run
    assert result.values[0, 0] == result.values[0, 2] == result.baseline
    # a sweep of the clean run into itself changes nothing anywhere
    same = sweep(tiny, clean, clean_cache, metric, "z", progress=False)
    torch.testing.assert_close(
        same.values, torch.full_like(same.values, same.baseline), atol=1e-5, rtol=0
    )
    assert same.baseline == pytest.approx(float(clean_value), abs=1e-5)
    # the last layer's resid_post at the read position *is* the clean answer there
    post = sweep(tiny, corrupted, clean_cache, metric, "resid_post", progress=False)
    assert post.values[-1, -1] == pytest.approx(float(clean_value), abs=1e-5)


def test_one_patch_equals_a_hand_written_hook(tiny, prompts, clean_cache):
    clean, corrupted = prompts
    name = "blocks.1.attn.hook_z"

    def by_hand(z, hook):
        z = z.clone()
        z[:, [2, 4], 3, :5] = clean_cache[name][:, [2, 4], 3, :5]
        return z

    expected = tiny.run_with_hooks(corrupted, fwd_hooks=[(name, by_hand)])
    got = patch(tiny, corrupted, name, clean_cache, pos=[2, 4], head=3, dims=5)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # a given tensor as the source
    zeros = torch.zeros_like(clean_cache["blocks.0.hook_mlp_out"])
    ablated = patch(tiny, corrupted, "blocks.0.hook_mlp_out", zeros, pos=-1)
    expected = tiny.run_with_hooks(
        corrupted,
        fwd_hooks=[
            ("blocks.0.hook_mlp_out", lambda a, hook: torch.cat([a[:, :-1], 0 * a[:, -1:]], 1))
        ],
    )
    torch.testing.assert_close(ablated, expected, atol=0, rtol=0)


@torch.no_grad()
def test_metrics_by_hand(tiny, prompts):
    clean, corrupted = prompts
    logits = tiny(clean)
    last = logits[:, -1]
    diff = metrics.logit_diff(ANSWER, WRONG)(logits)
    assert diff == pytest.approx(
        float((last[[0, 1, 2], ANSWER] - last[[0, 1, 2], WRONG]).mean()), abs=1e-5
    )
    probs = last.softmax(-1)[[0, 1, 2], ANSWER]
    assert metrics.prob(ANSWER)(logits) == pytest.approx(float(probs.mean()), rel=1e-5)
    assert metrics.log_prob(ANSWER)(logits) == pytest.approx(float(probs.log().mean()), rel=1e-5)
    assert metrics.kl_to_clean(logits)(logits) == pytest.approx(0, abs=1e-6)
    assert metrics.kl_to_clean(logits)(tiny(corrupted)) > 0
    norm = metrics.normalized(
        metrics.logit_diff(ANSWER, WRONG), clean=logits, corrupted=tiny(corrupted)
    )
    assert norm(logits) == pytest.approx(1, abs=1e-5)
    assert norm(tiny(corrupted)) == pytest.approx(0, abs=1e-5)


def test_declared_metrics_agree_with_plain_functions(tiny, prompts, clean_cache):
    """Only the declared logits are computed: the values must be those of full logits."""
    clean, corrupted = prompts
    for m in (
        metrics.log_prob(ANSWER, pos=4),
        metrics.kl_to_clean(tiny(clean), pos=torch.tensor([5, 2, 4])),
        metrics.normalized(metrics.logit_diff(ANSWER, WRONG), 3.0, -1.0),
        metrics.logit_diff(ANSWER, WRONG, pos=None),  # every position, two tokens
    ):
        fast = sweep(tiny, corrupted, clean_cache, m, "resid_mid", progress=False)
        slow = sweep(
            tiny, corrupted, clean_cache, lambda lg, m=m: m(lg), "resid_mid", progress=False
        )
        torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=0)


def test_bad_input_is_a_clear_error(tiny, prompts, clean_cache, metric):
    clean, corrupted = prompts
    with pytest.raises(ValueError, match="different shapes"):
        sweep(tiny, corrupted[:2], clean_cache, metric, progress=False)
    with pytest.raises(ValueError, match="different shapes"):
        sweep(tiny, corrupted, clean[:, :5], metric, progress=False)
    with pytest.raises(ValueError, match="different shapes"):
        patch(tiny, corrupted[:, :4], "blocks.0.hook_resid_pre", clean_cache)
    with pytest.raises(ValueError, match="not a scalar"):
        sweep(tiny, corrupted, clean_cache, lambda lg: lg[:, -1, 0], progress=False)
    with pytest.raises(ValueError, match="not a scalar"):
        patch(
            tiny, corrupted, "blocks.0.hook_resid_pre", clean_cache, metric=lambda lg: lg[:, -1, 0]
        )
    with pytest.raises(IndexError, match="out of range"):
        patch(tiny, corrupted, "blocks.0.hook_resid_pre", clean_cache, pos=6)
    with pytest.raises(IndexError, match="outside"):
        sweep(
            tiny, corrupted, clean_cache, metrics.logit_diff(ANSWER, WRONG, pos=9), progress=False
        )
    with pytest.raises(KeyError, match="resid_pre"):
        sweep(tiny, corrupted, clean_cache, metric, "resid_pr", progress=False)
    with pytest.raises(KeyError, match="Did you mean"):
        patch(tiny, corrupted, "blocks.0.hook_resid_pr", clean_cache)
    with pytest.raises(ValueError, match="no head axis"):
        patch(tiny, corrupted, "blocks.0.hook_resid_pre", clean_cache, head=0)
    with pytest.raises(IndexError, match="out of range"):
        path_patch(tiny, corrupted, clean_cache, metric, senders=[(5, 0)])
    assert no_hooks_left(tiny)


# ---- path patching -----------------------------------------------------------------------


@torch.no_grad()
def path_patch_by_hand(
    model, corrupted, clean_cache, metric, senders, receivers, inputs, freeze_mlps
):
    """Two plain forwards per sender set, every hook written out."""
    _, corr = model.run_with_cache(corrupted)
    hooks = []
    for layer in range(model.cfg.n_layers):

        def freeze(z, hook, layer=layer):
            out = corr[hook.name].clone()
            for sl, sh in senders:
                if sl == layer:
                    out[:, :, sh] = clean_cache[hook.name][:, :, sh]
            return out

        hooks.append((f"blocks.{layer}.attn.hook_z", freeze))
        if freeze_mlps:
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda a, hook: corr[hook.name]))
    if receivers == "logits":
        return metric(model.run_with_hooks(corrupted, fwd_hooks=hooks))
    saved = {}
    for layer, _ in receivers:
        for s in inputs:
            hooks.append(
                (
                    f"blocks.{layer}.attn.hook_{s}",
                    lambda a, hook: saved.update({hook.name: a.clone()}),
                )
            )
    model.run_with_hooks(corrupted, fwd_hooks=hooks)

    def put(a, hook):
        a = a.clone()
        for layer, head in receivers:
            if hook.name.startswith(f"blocks.{layer}."):
                h = head * a.shape[2] // model.cfg.n_heads  # grouped k/v: the query's kv head
                a[:, :, h] = saved[hook.name][:, :, h]
        return a

    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(n, put) for n in saved]))


@pytest.mark.parametrize(
    "receivers,inputs,freeze_mlps",
    [
        ([(1, 2)], "v", False),
        ([(1, 0), (1, 3)], "qk", True),
        ("logits", "qkv", False),
        ("logits", "qkv", True),
    ],
)
def test_path_patching_matches_by_hand(
    tiny, prompts, clean_cache, metric, receivers, inputs, freeze_mlps
):
    corrupted = prompts[1]
    result = path_patch_sweep(
        tiny,
        corrupted,
        clean_cache,
        metric,
        receivers,
        inputs,
        freeze_mlps=freeze_mlps,
        chunk_cells=3,
        progress=False,
    )
    assert result.values.shape == (2, 4) and result.axes == ("layer", "head")
    for layer in range(2):
        for head in range(4):
            expected = path_patch_by_hand(
                tiny,
                corrupted,
                clean_cache,
                metric,
                [(layer, head)],
                receivers,
                inputs,
                freeze_mlps,
            )
            assert result.values[layer, head] == pytest.approx(float(expected), abs=1e-5)
    senders = [(0, 1), (0, 3), (1, 2)]
    several = path_patch(
        tiny, corrupted, clean_cache, metric, senders, receivers, inputs, freeze_mlps=freeze_mlps
    )
    expected = path_patch_by_hand(
        tiny, corrupted, clean_cache, metric, senders, receivers, inputs, freeze_mlps
    )
    assert float(several) == pytest.approx(float(expected), abs=1e-5)
    assert no_hooks_left(tiny)


@pytest.mark.parametrize("inputs", ["q", "k", "v", "qkv"])
def test_path_patching_into_grouped_keys_and_values_matches_by_hand(inputs):
    """Grouped-query attention (4 query heads, 2 key/value heads): a receiver's k/v is the
    key/value head its group shares."""
    torch.manual_seed(0)
    cfg = dict(n_layers=3, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=50, n_ctx=16)
    model = resid.Model(resid.Config(**cfg, normalization="RMS", positional="rotary",
                                     gated_mlp=True, n_kv_heads=2, act_fn="silu"))  # fmt: skip
    with torch.no_grad():  # weights large enough for every path to move the metric
        for p in model.parameters():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50, (3, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, [1, 3]] = torch.randint(0, 50, (3, 2), generator=g)
    cache = model.run_with_cache(clean)[1]
    metric = metrics.logit_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), pos=-1)
    senders, receivers = [(0, 1), (1, 2)], [(2, 1), (2, 3)]
    got = path_patch(model, corrupted, cache, metric, senders, receivers, inputs)
    expected = path_patch_by_hand(
        model, corrupted, cache, metric, senders, receivers, inputs, False
    )
    assert float(got) == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(got) - float(metric(model(corrupted)))) > 1e-3  # the path matters
    assert no_hooks_left(model)


# ---- attribution patching ------------------------------------------------------------------


def test_attribution_is_exact_for_a_linear_metric(tiny, prompts, clean_cache, metric):
    """Logits are linear in ``ln_final.hook_normalized`` and the logit difference is linear
    in the logits, so the first-order estimate is the patch itself."""
    clean, corrupted = prompts
    name = "ln_final.hook_normalized"
    _, cache = tiny.run_with_cache(clean, names_filter=[name])
    est = attribution_patch(tiny, corrupted, cache, metric, name)
    real = torch.stack(
        [patch(tiny, corrupted, name, cache, pos=p, metric=metric) for p in range(6)]
    )
    assert est.axes == ("pos",)
    torch.testing.assert_close(est.values, real, atol=1e-4, rtol=0)


def test_attribution_tracks_real_patching(tiny, prompts, clean_cache, metric):
    clean, corrupted = prompts
    for site in ("resid_pre", "z"):
        est = attribution_patch(tiny, corrupted, clean_cache, metric, site)
        real = sweep(tiny, corrupted, clean_cache, metric, site, progress=False)
        assert est.values.shape == real.values.shape
        assert correlation(est, real) > 0.9, site
    assert no_hooks_left(tiny)


def test_hook_name_and_sweep_labels(tiny, prompts, clean_cache, metric):
    assert hook_name("z", 1) == "blocks.1.attn.hook_z" in tiny.hook_dict
    result = sweep(tiny, prompts[1], clean_cache, metric, "out", by_pos=False, progress=False)
    assert result.axes == ("layer", "head") and result.labels_of("head") == ["H0", "H1", "H2", "H3"]
    assert set(result.argmax()) == {"layer", "head"}


# ---- hooks attached around a tool, and padded batches -----------------------------------


def ablate_head(layer: int, head: int):
    def hook(z, h):
        z = z.clone()
        z[:, :, head] = 0
        return z

    return f"blocks.{layer}.attn.hook_z", hook


def one_forward_per_cell(model, corrupted, clean, metric, site):
    """The reference: one forward per cell with a patch hook, under whatever hooks are
    attached around it; ``[layer, pos]``, or ``[layer, pos, head]`` for ``z``."""
    _, cache = model.run_with_cache(clean)
    L, T, H = model.cfg.n_layers, corrupted.shape[1], model.cfg.n_heads
    heads = range(H) if site == "z" else [None]
    out = torch.empty(L, T, len(heads))
    for layer in range(L):
        name = hook_name(site, layer)
        for p in range(T):
            for j, h in enumerate(heads):

                def put(act, hook, p=p, h=h, name=name):
                    act = act.clone()
                    at = (slice(None), p) if h is None else (slice(None), p, h)
                    act[at] = cache[name][at]
                    return act

                with torch.no_grad():
                    logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, put)])
                out[layer, p, j] = metric(logits)
    return out if site == "z" else out[..., 0]


@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_sweep_honours_enclosing_hooks(tiny, prompts, metric, site):
    clean, corrupted = prompts
    with tiny.hooks([ablate_head(0, 1)]):
        result = sweep(tiny, corrupted, clean, metric, site, progress=False)
        reference = one_forward_per_cell(tiny, corrupted, clean, metric, site)
    assert torch.equal(result.values, reference)
    plain = sweep(tiny, corrupted, clean, metric, site, progress=False)
    assert (plain.values - reference).abs().max() > 1e-3  # the hook mattered
    assert no_hooks_left(tiny)


def test_path_patching_refuses_enclosing_hooks(tiny, prompts, clean_cache, metric):
    with tiny.hooks([ablate_head(0, 1)]):
        with pytest.raises(RuntimeError, match="path patching"):
            path_patch_sweep(tiny, prompts[1], clean_cache, metric, progress=False)
    assert no_hooks_left(tiny)


def test_attribution_honours_enclosing_hooks(tiny, prompts, metric):
    """logits = normalized · w + b through W_U: linear in ln_final.hook_normalized, so the
    attribution estimate there is exact, also under an enclosing ablation."""
    clean, corrupted = prompts
    site = "ln_final.hook_normalized"
    with tiny.hooks([ablate_head(1, 2)]):
        est = attribution_patch(tiny, corrupted, clean, metric, site)
        _, cache = tiny.run_with_cache(clean, names_filter=[site])
        real = torch.stack(
            [patch(tiny, corrupted, site, cache, pos=p, metric=metric) for p in range(6)]
        )
        plain = attribution_patch(tiny, corrupted, clean, metric, site)
    torch.testing.assert_close(est.values, real, atol=1e-4, rtol=0)
    assert est.axes == ("pos",)
    assert torch.equal(plain.values, est.values)  # the same forward under the same hook
    unhooked = attribution_patch(tiny, corrupted, clean, metric, site)
    assert (unhooked.values - est.values).abs().max() > 1e-3
    assert no_hooks_left(tiny)


def test_attribution_on_a_head_site_keeps_the_head_axis(tiny, prompts, clean_cache, metric):
    est = attribution_patch(tiny, prompts[1], clean_cache, metric, "blocks.1.attn.hook_z")
    assert est.axes == ("pos", "head") and est.values.shape == (6, 4)
    best = est.argmax()
    assert est.values[best["pos"], best["head"]] == est.values.max()
    pattern = attribution_patch(tiny, prompts[1], clean_cache, metric, "blocks.1.attn.hook_pattern")
    assert pattern.axes == ("head", "pos") and pattern.values.shape == (4, 6)


def test_padded_sweep_is_the_mean_of_per_prompt_sweeps(tiny):
    """Right-padded prompts of lengths 6 and 4: each cell of the batched sweep is the mean
    of the two prompts' own sweeps (a patch at a padding position changes nothing there)."""
    g = torch.Generator().manual_seed(3)
    lengths = (6, 4)
    clean = torch.randint(0, 50257, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, 50257, (2,), generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths], dtype=torch.bool)
    clean[~mask] = corrupted[~mask] = 50256
    m = metrics.logit_diff(ANSWER[:2], WRONG[:2], pos=-1)
    batched = sweep(tiny, corrupted, clean, m, "resid_pre", attention_mask=mask, progress=False)
    per_prompt = []
    for i, n in enumerate(lengths):
        mi = metrics.logit_diff(ANSWER[i : i + 1], WRONG[i : i + 1], pos=-1)
        alone = sweep(
            tiny, corrupted[i : i + 1, :n], clean[i : i + 1, :n], mi, "resid_pre", progress=False
        )
        padded = torch.full((2, 6), alone.baseline)
        padded[:, :n] = alone.values
        per_prompt.append(padded)
    torch.testing.assert_close(
        batched.values, (per_prompt[0] + per_prompt[1]) / 2, atol=1e-5, rtol=0
    )
