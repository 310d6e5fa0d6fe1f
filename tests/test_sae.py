"""SAEs: SAELens parity, splicing, features as directions, attribution and patching, bad
input. The references are SAELens' own outputs (tests/data/sae, written by
scripts/make_sae_fixtures.py) and plain hooks and formulas written out here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import resid
from resid import metrics
from resid.interventions.patching import attribution_patch, patch
from resid.sae import (
    SAE,
    SAEConfig,
    SAEError,
    attribute_features,
    feature_circuit,
    patch_features,
)

DATA = Path(__file__).parent / "data" / "sae"
FIXTURES = sorted(p for p in DATA.iterdir() if p.is_dir())
SITE = "blocks.1.hook_resid_pre"


def random_sae(arch="standard", site=SITE, d_in=64, d_sae=256, seed=0, **cfg) -> SAE:
    if arch == "topk":
        cfg.setdefault("k", 16)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=site, architecture=arch, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("W_"):
                p.copy_(torch.randn(p.shape, generator=g) / d_in**0.5)
            elif name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return sae


def no_sae_left(model, names_before):
    return model.attached_hooks() == [] and list(model.hook_dict) == names_before


# ---- SAELens parity -------------------------------------------------------------------


def test_fixtures_are_small_and_cover_every_architecture():
    archs = {json.loads((p / "cfg.json").read_text())["architecture"] for p in FIXTURES}
    assert archs == {"standard", "topk", "jumprelu", "gated"}
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) < 200_000


@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_encode_decode_match_saelens(folder):
    sae = resid.sae.load(folder)
    want = load_file(folder / "expected.safetensors")
    x = want["x"]
    with torch.no_grad():
        pre, acts = sae.encode_pre(x), sae.encode(x)
        recons = sae.decode(acts, x)
    for got, ref in ((pre, "acts_pre"), (acts, "acts"), (recons, "recons")):
        assert (got - want[ref]).abs().max() <= 1e-5, ref
    assert torch.equal(acts != 0, want["acts"] != 0)  # the same features fire
    with torch.no_grad():
        assert (sae(x) - want["recons"]).abs().max() <= 1e-5


@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_save_round_trips_saelens_format(folder, tmp_path):
    sae = resid.sae.load(folder)
    out = resid.sae.save(sae, tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == [
        "cfg.json",
        "resid-manifest.json",
        "sae_weights.safetensors",
    ]
    theirs, ours = (json.loads((f / "cfg.json").read_text()) for f in (folder, out))
    for key in ("d_in", "d_sae", "architecture", "apply_b_dec_to_input", "normalize_activations"):
        assert ours[key] == theirs[key]
    assert ours["metadata"]["hook_name"] == theirs["metadata"]["hook_name"]
    assert ours.get("k") == theirs.get("k")
    a, b = load_file(folder / "sae_weights.safetensors"), load_file(out / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pre_6_config_layout_is_read(tmp_path):
    """SAELens < 6 wrote a flat cfg.json with hook_point and activation_fn_str."""
    src = DATA / "topk"
    cfg = json.loads((src / "cfg.json").read_text())
    old = {
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "hook_point": cfg["metadata"]["hook_name"],
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": cfg["k"]},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "dtype": "torch.float32",
    }
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(old))
    shutil.copy(src / "sae_weights.safetensors", folder)
    sae = resid.sae.load(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == cfg["k"] and sae.hook_name == SITE


# ---- splicing -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_splice_with_error_term_leaves_logits_unchanged(tiny, tokens, arch):
    sae = random_sae(arch)
    names = list(tiny.hook_dict)
    with torch.no_grad():
        ref = tiny(tokens)
        with tiny.saes([sae]):
            assert torch.equal(tiny(tokens), ref)
            logits, cache = tiny.run_with_cache(tokens)
            assert torch.equal(logits, ref)
    assert torch.equal(tiny.run_with_saes(tokens, [sae]), ref)  # with autograd on, too
    with tiny.saes([sae]):  # observed, with autograd on
        assert torch.equal(tiny.run_with_cache(tokens)[0], ref)
    acts = cache[f"{SITE}.sae.hook_acts"]
    assert acts.shape == (*tokens.shape, 256)
    x = cache[f"{SITE}.sae.hook_input"]
    recons, error = cache[f"{SITE}.sae.hook_recons"], cache[f"{SITE}.sae.hook_error"]
    assert torch.allclose(recons + error, x, atol=1e-6)
    # both halves are real: the reconstruction is neither ~0 nor ~x, so the error is not ~0
    for part in (recons, error):
        assert (part.norm(dim=-1) / x.norm(dim=-1)).min() > 0.05
    if arch == "topk":
        assert ((acts != 0).sum(-1) <= 16).all()
    assert no_sae_left(tiny, names)


@pytest.mark.parametrize(
    "site",
    ["blocks.0.ln1.hook_normalized", "blocks.1.ln2.hook_normalized", "ln_final.hook_normalized"],
)
def test_observed_splice_at_a_norm_output_leaves_logits_unchanged(tiny, tokens, site):
    """Caching a spliced SAE's own sites at a norm's output, with autograd off and on: the
    logits are the model's, bit for bit (the splice hands back the values it saw, and the
    norm's output for them is its kernel's), and the gradient still reaches the SAE."""
    sae = random_sae("standard", site=site)
    with torch.no_grad():
        ref = tiny(tokens)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), tiny.saes([sae]):
            logits, cache = tiny.run_with_cache(tokens)
        assert torch.equal(logits, ref), grad
    assert cache[f"{site}.sae.hook_acts"].shape == (*tokens.shape, 256)
    logits[:, -1].logsumexp(-1).sum().backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert no_sae_left(tiny, list(tiny.hook_dict))


def hand_standard_recons(sae, x):
    """ReLU((x - b_dec) W_enc + b_enc) W_dec + b_dec, written out."""
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    return acts @ sae.W_dec + sae.b_dec


def test_splice_without_error_term_writes_the_reconstruction(tiny, tokens):
    sae = random_sae("standard")
    with torch.no_grad():
        with tiny.saes([sae], use_error_term=False):
            spliced = tiny(tokens)
        write = lambda x, hook: sae(x)  # noqa: E731 - a plain hook writing the reconstruction
        ref = tiny.run_with_hooks(tokens, fwd_hooks=[(SITE, write)])
        assert torch.equal(spliced, ref)
        by_hand = tiny.run_with_hooks(
            tokens, fwd_hooks=[(SITE, lambda x, h: hand_standard_recons(sae, x))]
        )
        assert torch.allclose(spliced, by_hand, atol=1e-4)
        assert not torch.allclose(spliced, tiny(tokens), atol=1e-3)  # it does change something


def test_hooks_on_sae_sites_take_effect(tiny, tokens):
    """Zeroing one feature through its hook point equals adding -act * write to the stream."""
    sae = random_sae("standard")
    _, cache = tiny.run_with_cache(tokens, names_filter=[SITE])
    with torch.no_grad():
        acts = sae.encode(cache[SITE])
    f = int(acts.sum((0, 1)).argmax())

    def ablate(a, hook):
        a = a.clone()
        a[..., f] = 0
        return a

    def ablate_in_place(a, hook):  # TransformerLens' idiom: edit, return nothing
        a[..., f] = 0

    with torch.no_grad(), tiny.saes([sae]):
        got = tiny.run_with_hooks(tokens, fwd_hooks=[(f"{SITE}.sae.hook_acts", ablate)])
        in_place = tiny.run_with_hooks(
            tokens, fwd_hooks=[(f"{SITE}.sae.hook_acts", ablate_in_place)]
        )
    shift = lambda x, hook: x - acts[..., f, None] * sae.W_dec[f].detach()  # noqa: E731
    with torch.no_grad():
        ref = tiny.run_with_hooks(tokens, fwd_hooks=[(SITE, shift)])
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(in_place, got)
    assert not torch.allclose(got, tiny(tokens), atol=1e-4)


def test_backward_hooks_and_gradient_cache_on_sae_sites(tiny, tokens):
    sae = random_sae("standard")
    name = f"{SITE}.sae.hook_acts"
    with tiny.saes([sae]):
        loss, cache = tiny.run_with_cache(
            tokens, names_filter=[name], incl_bwd=True, return_type="loss"
        )
    grad = cache[f"{name}_grad"]
    # reference: d loss / d acts = d loss / d resid_pre @ W_decᵀ (the splice adds acts @ W_dec)
    _, ref_cache = tiny.run_with_cache(
        tokens, names_filter=[SITE], incl_bwd=True, return_type="loss"
    )
    want = ref_cache[f"{SITE}_grad"] @ sae.W_dec.detach().T
    assert torch.allclose(grad, want, atol=1e-6)
    # the stream's gradient below the SAE is the unspliced model's
    with tiny.saes([sae]):
        _, c2 = tiny.run_with_cache(
            tokens, names_filter=["blocks.0.hook_resid_mid"], incl_bwd=True, return_type="loss"
        )
    _, c3 = tiny.run_with_cache(
        tokens, names_filter=["blocks.0.hook_resid_mid"], incl_bwd=True, return_type="loss"
    )
    assert torch.allclose(
        c2["blocks.0.hook_resid_mid_grad"], c3["blocks.0.hook_resid_mid_grad"], atol=1e-7
    )


def test_two_saes_and_hook_z(tiny, tokens):
    a = random_sae("topk", site="blocks.0.hook_resid_post")
    z = random_sae("standard", site="blocks.1.attn.hook_z", reshape_activations="hook_z")
    with torch.no_grad():
        ref = tiny(tokens)
        with tiny.saes([a, z]):
            logits, cache = tiny.run_with_cache(tokens, names_filter=lambda n: ".sae." in n)
        assert torch.equal(logits, ref)
        assert cache["blocks.1.attn.hook_z.sae.hook_recons"].shape == (*tokens.shape, 4, 16)
        assert cache["blocks.1.attn.hook_z.sae.hook_acts"].shape == (*tokens.shape, 256)


# ---- features as directions -----------------------------------------------------------


def test_features_read_and_write_and_stream_query(tiny, tokens):
    sae = random_sae("standard", apply_b_dec_to_input=False)
    with torch.no_grad(), tiny.saes([sae]):
        _, cache = tiny.run_with_cache(tokens)
    f = sae.feature(5, tiny)
    assert torch.equal(f.read, sae.W_enc[:, 5]) and torch.equal(f.write, sae.W_dec[5])
    assert f.read.data_ptr() == sae.W_enc[:, 5].data_ptr()  # views, not copies
    stream = cache.stream(1, "pre")
    pre = stream.query(sae.W_enc.detach()) + sae.b_enc.detach()  # the stream's vocabulary
    assert torch.allclose(pre, cache[f"{SITE}.sae.hook_acts_pre"], atol=1e-5)
    acts = cache[f"{SITE}.sae.hook_acts"][..., 5]
    assert torch.equal(f.activation(cache), acts)
    assert torch.allclose(f.activation(stream), torch.relu(pre[..., 5]), atol=1e-5)
    assert f.activation(stream.states[1, 3]) == pytest.approx(float(acts[1, 3]), abs=1e-5)
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre"):
        f.activation(cache.stream(0, "pre"))
    effect = f.logit_effect(k=3)
    want = sae.W_dec[5].detach() @ tiny.W_U.detach()
    assert torch.allclose(effect.logits, want)
    assert effect.top[0][1] == pytest.approx(float(want.max()), rel=1e-5)


@pytest.mark.parametrize("use_error_term", [True, False])
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_direct_feature_attribution_sums_to_logit_difference(tiny, tokens, use_error_term, norm):
    sae = random_sae("standard", normalize_activations=norm)
    a, b = 262, 1212  # any two tokens
    with torch.no_grad(), tiny.saes([sae], use_error_term=use_error_term):
        logits, cache = tiny.run_with_cache(tokens)
    dfa = sae.logit_attribution(cache, (a, b))
    want = logits[..., a] - logits[..., b]
    assert (dfa.sum() - want).abs().max() <= 1e-5
    labels = dfa.labels
    assert labels[0].startswith("F") and "sae.b_dec" in labels and "ln_final.b" in labels
    assert ("sae.error" in labels) == use_error_term
    assert "L1H0" in labels and "L0H0" not in labels  # only parts written after the site
    # one feature's part, by hand: act * (W_dec[i] · centred(w * u)) / scale
    i = int(labels[0][1:])
    u = tiny.W_U[:, a] - tiny.W_U[:, b]
    wu = u * tiny.ln_final.w
    direction = (wu - wu.mean()).detach()
    scale = cache["ln_final.hook_scale"][..., 0]
    out_scale = 1.0
    if norm == "layer_norm":
        x = cache[f"{SITE}.sae.hook_input"]
        out_scale = (x - x.mean(-1, keepdim=True)).std(-1)
    by_hand = (
        cache[f"{SITE}.sae.hook_acts"][..., i]
        * (sae.W_dec[i].detach() @ direction)
        * out_scale
        / scale
    )
    assert torch.allclose(dfa[labels[0]], by_hand, atol=1e-6)


# ---- attribution and patching ---------------------------------------------------------


@pytest.fixture
def ioi_pair(tiny):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 50257, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 50257, (2,), generator=g)
    metric = metrics.logit_diff(answer=torch.tensor([11, 12]), wrong=torch.tensor([13, 14]))
    return clean, corrupted, metric


def test_attribution_is_exact_for_a_linear_metric(tiny, ioi_pair):
    """At ln_final.hook_normalized the logit difference is linear in the SAE's output, and
    the spliced output is linear in each feature's activation: estimate == real patch."""
    clean, corrupted, metric = ioi_pair
    sae = random_sae("standard", site="ln_final.hook_normalized")
    with tiny.saes([sae]):
        _, clean_cache = tiny.run_with_cache(clean)
        est = attribute_features(tiny, corrupted, clean_cache, metric, [sae])
        moved = (est.values - est.baseline).abs().topk(12).indices.tolist()
        real = patch_features(tiny, corrupted, clean_cache, metric, [sae], moved)
        # resid.patching's estimate at the same hook: per position, summed over features
        per_pos = attribution_patch(tiny, corrupted, clean_cache, metric, sae.name_of("hook_acts"))
    assert torch.allclose(est.values[moved], real.values, atol=1e-4)
    assert (est.values[moved] - est.baseline).abs().max() > 1e-3  # something moved
    total = lambda r: float(r.values.sum() - r.values.numel() * r.baseline)  # noqa: E731
    assert total(per_pos) == pytest.approx(total(est), abs=1e-4)


def test_patch_features_equals_one_forward_per_feature(tiny, ioi_pair):
    clean, corrupted, metric = ioi_pair
    sae = random_sae("topk", site="blocks.1.hook_resid_mid")
    name = sae.name_of("hook_acts")
    with torch.no_grad(), tiny.saes([sae]):
        _, clean_cache = tiny.run_with_cache(clean)
        feats = (clean_cache[name] != 0).any(0).any(0).nonzero()[:6, 0].tolist()
        got = patch_features(tiny, corrupted, clean_cache, metric, [sae], feats, chunk=4)
        for j, f in enumerate(feats):

            def put(a, hook, f=f):
                a = a.clone()
                a[..., f] = clean_cache[name][..., f]
                return a

            ref = metric(tiny.run_with_hooks(corrupted, fwd_hooks=[(name, put)]))
            assert float(got.values[j]) == pytest.approx(float(ref), abs=1e-5)
    assert got.labels == [f"F{f}" for f in feats]
    # resid.patching.patch addresses the SAE's site like any other
    with torch.no_grad(), tiny.saes([sae]):
        one = patch(tiny, corrupted, name, clean_cache, pos=-1, metric=metric)

        def last(a, hook):
            a = a.clone()
            a[:, -1] = clean_cache[name][:, -1]
            return a

        ref = metric(tiny.run_with_hooks(corrupted, fwd_hooks=[(name, last)]))
    assert float(one) == pytest.approx(float(ref), abs=1e-6)


def test_feature_circuit_correlation(tiny, ioi_pair):
    clean, corrupted, metric = ioi_pair
    sae = random_sae("standard", site="blocks.1.hook_resid_post")
    with tiny.saes([sae]):
        _, clean_cache = tiny.run_with_cache(clean)
        circuit = feature_circuit(tiny, corrupted, clean_cache, metric, [sae], k=8)
    assert len(circuit.top) == 8 and len(circuit.table()) == 8
    assert circuit.correlation > 0.5


def test_feature_tools_need_the_sae_spliced(tiny, ioi_pair):
    clean, corrupted, metric = ioi_pair
    with pytest.raises(ValueError, match="not spliced"):
        attribute_features(tiny, corrupted, clean, metric, [random_sae()])


# ---- bad input ------------------------------------------------------------------------


def test_mismatched_sae_is_refused_before_anything_is_attached(tiny, tokens):
    names = list(tiny.hook_dict)
    good = random_sae()
    wide = random_sae(d_in=768, site="blocks.0.hook_resid_pre")
    with pytest.raises(SAEError, match=r"d_in=768.*blocks.0.hook_resid_pre.*width 64"):
        with tiny.saes([good, wide]):
            pass
    assert no_sae_left(tiny, names)
    elsewhere = random_sae(site="blocks.7.hook_resid_pre")
    with pytest.raises(KeyError, match=r"blocks.7.hook_resid_pre.*lacks"):
        with tiny.saes([good, elsewhere]):
            pass
    assert no_sae_left(tiny, names)
    with pytest.raises(ValueError, match="already spliced"):
        with tiny.saes([good, random_sae(seed=1)]):
            pass
    assert no_sae_left(tiny, names)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny.saes([good]):
            raise RuntimeError("boom")
    assert no_sae_left(tiny, names)
    with torch.no_grad():
        assert torch.equal(tiny(tokens), tiny.run_with_hooks(tokens))


def write_case(tmp_path, cfg_edit=None, weights_edit=None, raw_cfg=None) -> Path:
    folder = tmp_path / "bad"
    shutil.copytree(DATA / "jumprelu", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (folder / "cfg.json").write_text(raw_cfg if raw_cfg is not None else json.dumps(cfg))
    w = load_file(folder / "sae_weights.safetensors")
    if weights_edit:
        weights_edit(w)
    save_file(w, folder / "sae_weights.safetensors")
    return folder


@pytest.mark.parametrize(
    "case, match",
    [
        (
            dict(cfg_edit=lambda c: c.update(architecture="matryoshka")),
            "unknown architecture 'matryoshka'",
        ),
        (dict(raw_cfg="[1, 2, 3]"), "must hold a JSON object.*not a list"),
        (dict(raw_cfg="{not json"), "cannot read .* as JSON"),
        (dict(cfg_edit=lambda c: c.update(d_sae=-3)), "d_sae must be a positive integer"),
        (
            dict(cfg_edit=lambda c: c.update(normalize_activations="whiten")),
            "normalize_activations",
        ),
        (dict(weights_edit=lambda w: w.pop("threshold")), "missing threshold"),
        (dict(weights_edit=lambda w: w.update(extra=torch.zeros(2))), "unexpected extra"),
        (
            dict(weights_edit=lambda w: w.update(W_enc=torch.zeros(16, 63))),
            r"W_enc \(16, 63\) \(want \(16, 64\)\)",
        ),
        (
            dict(weights_edit=lambda w: w["W_dec"].__setitem__((3, 2), float("nan"))),
            "W_dec hold NaN",
        ),
        (
            dict(weights_edit=lambda w: w.update(b_dec=torch.zeros(16, dtype=torch.int32))),
            "must hold floats",
        ),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, case, match):
    with pytest.raises(SAEError, match=match):
        resid.sae.load(write_case(tmp_path, **case))


def test_missing_files_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(SAEError, match="has no sae_weights.safetensors"):
        (tmp_path / "cfg.json").write_text("{}")
        resid.sae.load(tmp_path)
    with pytest.raises(SAEError, match="not a folder"):
        resid.sae.load(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        SAEError, match="could not get the SAE 'blocks.8.hook_resid_pre'.*local cache"
    ):
        resid.sae.load("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")


# ---- the old import path ---------------------------------------------------------------


OLD_NAMES = ["SAE", "Feature", "FeatureCircuit", "SAEConfig", "SAEError", "attribute_features",
             "feature_circuit", "load", "patch_features", "save", "site_width", "ARCHITECTURES",
             "NORMALISATIONS", "Architecture", "CFG_FILE", "WEIGHTS_FILE"]  # fmt: skip


@pytest.mark.parametrize("name", OLD_NAMES)
def test_every_name_of_the_old_module_still_imports_with_a_warning(name):
    import importlib

    import resid.sae as new

    old = importlib.import_module("resid.interventions.sae")
    with pytest.warns(DeprecationWarning, match=f"resid.sae.{name}"):
        obj = getattr(old, name)
    where = {"ARCHITECTURES": new.config, "NORMALISATIONS": new.config, "Architecture": new.config,
             "CFG_FILE": new.files, "WEIGHTS_FILE": new.files}.get(name, new)  # fmt: skip
    assert obj is getattr(where, name)
    assert name in old.__all__ or name.isupper() or name == "Architecture"


def test_site_width_of_the_old_module(tiny):
    assert resid.sae.site_width(tiny, "blocks.0.attn.hook_z") == 64  # heads flattened
    assert resid.sae.site_width(tiny, "blocks.0.mlp.hook_post") == 256
    assert resid.sae.site_width(tiny, "blocks.0.attn.hook_pattern") is None
    assert resid.sae.site_width(tiny, "blocks.0.attn.hook_z", "none") is None
