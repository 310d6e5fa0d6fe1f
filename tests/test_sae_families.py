"""SAEs on every family resid runs, LayerNorm and RMSNorm alike: the splice leaves the
logits unchanged with a non-trivial reconstruction and error term, direct feature
attribution sums to the logit difference that Hugging Face's own model computes and
equals a per-feature formula written out here (centred for LayerNorm, not for RMSNorm),
and a feature's logit effect follows the model's norm and shows the model's tokens."""

from __future__ import annotations

import json

import pytest
import torch

import resid
from resid.io.references import random_hf_family
from resid.sae import SAE, SAEConfig, direct_feature_attribution

V = 300  # random_hf_family's tiny vocabulary: BOS 0, EOS 1
# family -> whether its norm is RMSNorm: no centring, no bias
FAMILIES = {"gpt2": False, "gpt_neo": False, "pythia": False, "llama": True, "mistral": True,
            "qwen2": True}  # fmt: skip
SITE = "blocks.1.hook_resid_pre"
TOKENS = torch.tensor([[0, 5, 17, 42, 8, 99, 3], [0, 250, 7, 7, 61, 2, 11]])
A, B = 12, 40  # the logit difference attributed


def save_tokenizer(folder) -> None:
    """A word-level tokenizer of the tiny vocabulary ("w5" is token 5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", "</s>"] + [f"w{i}" for i in range(2, V - 1)] + ["<unk>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    rms = FAMILIES[request.param]
    hf = random_hf_family(request.param)  # norm gains near 1 (and not all equal)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    save_tokenizer(folder)
    model = resid.load(folder, device="cpu")
    return request.param, hf, model, rms


def final_norm(name: str, hf) -> torch.nn.Module:
    """Hugging Face's final norm module of each family."""
    if name in ("gpt2", "gpt_neo"):
        return hf.transformer.ln_f
    return hf.gpt_neox.final_layer_norm if name == "pythia" else hf.model.norm


def random_sae(d_in: int, seed: int = 0, **cfg) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=128, hook_name=SITE, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = d_in**-0.5 if name.startswith("W_") else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return sae


def test_the_norm_kind_is_what_the_family_uses(family):
    name, _, model, rms = family
    assert (model.cfg.normalization == "RMS") == rms, name


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_splice_is_exact_with_a_real_reconstruction_and_error(family, norm):
    name, _, model, _ = family
    sae = random_sae(model.cfg.d_model, normalize_activations=norm)
    with torch.no_grad():
        plain = model(TOKENS)
        with model.saes([sae]):
            logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: ".sae." in n)
    assert torch.equal(logits, plain), name
    x = cache[sae.name_of("hook_input")]
    recons, error = cache[sae.name_of("hook_recons")], cache[sae.name_of("hook_error")]
    torch.testing.assert_close(recons + error, x)
    # both halves carry a real share of the activation: neither is ~0, neither is ~x
    for part in (recons, error):
        share = (part.norm(dim=-1) / x.norm(dim=-1)).min()
        assert 0.05 < float(share), (name, norm, float(share))
    assert float((recons - x).norm(dim=-1).min()) > 1e-2
    assert (cache[sae.name_of("hook_acts")] != 0).any(-1).all()  # features fire everywhere


@pytest.mark.parametrize("use_error_term", [True, False])
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_direct_feature_attribution_sums_to_hugging_faces_logit_difference(
    family, use_error_term, norm
):
    name, hf, model, rms = family
    sae = random_sae(model.cfg.d_model, normalize_activations=norm)
    with torch.no_grad(), model.saes([sae], use_error_term=use_error_term):
        logits, cache = model.run_with_cache(TOKENS)
    dfa = direct_feature_attribution(sae, cache, (A, B))
    assert torch.equal(dfa.values, sae.logit_attribution(cache, (A, B)).values)
    want = logits[..., A] - logits[..., B]
    # the law: the parts add up to the logit difference, as tight as the model's own DLA
    dla = cache.logit_attribution((A, B))
    dla_err = float((dla.sum() - want).abs().max())
    err = float((dfa.sum() - want).abs().max())
    assert err <= max(4 * dla_err, 2e-6), (name, err, dla_err)
    if use_error_term:  # and that difference is Hugging Face's
        with torch.no_grad():
            ref = hf(TOKENS).logits
        assert float((dfa.sum() - (ref[..., A] - ref[..., B])).abs().max()) < 1e-4, name

    # one feature's part by hand: act * (W_dec[i] . d) * out_scale / scale, with
    # d = gain * (W_U[:, A] - W_U[:, B]), centred only for LayerNorm
    labels = dfa.labels
    u = hf.get_output_embeddings().weight.detach()
    u = u[A] - u[B]
    norm_module = final_norm(name, hf)
    d = norm_module.weight.detach() * u
    if not rms:
        d = d - d.mean()
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    centred = final if rms else final - final.mean(-1, keepdim=True)
    eps = norm_module.variance_epsilon if rms else norm_module.eps
    scale = (centred.pow(2).mean(-1) + eps).sqrt()
    out_scale = 1.0
    if norm == "layer_norm":
        x = cache[sae.name_of("hook_input")]
        out_scale = (x - x.mean(-1, keepdim=True)).std(-1)
    features = [lab for lab in labels if lab.startswith("F")]
    assert len(features) > 10
    for label in features[:5]:
        i = int(label[1:])
        by_hand = (
            cache[sae.name_of("hook_acts")][..., i]
            * (sae.W_dec[i].detach() @ d)
            * out_scale
            / scale
        )
        torch.testing.assert_close(dfa[label], by_hand, atol=1e-6, rtol=1e-4)
    assert ("ln_final.b" in labels) == (not rms)
    assert ("sae.error" in labels) == use_error_term


def test_logit_effect_follows_the_norm_and_the_tokenizer(family):
    name, hf, model, rms = family
    sae = random_sae(model.cfg.d_model)
    f = sae.feature(3, model)
    W_U = hf.get_output_embeddings().weight.detach().T
    write = sae.W_dec[3].detach()
    torch.testing.assert_close(f.logit_effect(k=4).logits, write @ W_U)
    gain = final_norm(name, hf).weight.detach()
    through = (write if rms else write - write.mean()) * gain
    effect = f.logit_effect(k=4, through_ln=True)
    torch.testing.assert_close(effect.logits, through @ W_U)
    words = ["<s>", "</s>"] + [f"w{i}" for i in range(2, V - 1)] + ["<unk>"]
    ids = (through @ W_U).topk(4).indices.tolist()
    assert [tok for tok, _ in effect.top] == [words[i] for i in ids], name  # not "<17>"
