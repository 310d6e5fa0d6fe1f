"""resid.process_weights against TransformerLens' own processing of the same checkpoint
(its TransformerBridge.process_weights), and against the laws each step keeps: the
log-probabilities are unchanged and the loaded model is never touched."""

from __future__ import annotations

import warnings

import pytest
import torch

import resid
from resid.core.layers import LNPre, RMSPre
from resid.core.processing import process_weights
from resid.io.references import random_hf_family

transformer_lens = pytest.importorskip("transformer_lens")

from test_families import TOKENS, save_tokenizer  # noqa: E402

WEIGHTS = ["W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_in", "W_out", "W_U", "b_U",
           "W_E", "W_pos"]  # fmt: skip
OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def bridge(hf, folder: str | None, **options):
    """TransformerLens' bridge over a copy of ``hf``, processed with ``options``."""
    from transformer_lens.model_bridge import TransformerBridge

    from resid.io.references import hf_tokenizer

    copy = type(hf)(hf.config).eval()
    copy.load_state_dict(hf.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = TransformerBridge.boot_transformers(
            folder or "gpt2", hf_model=copy, device="cpu", tokenizer=hf_tokenizer()
        )
        b.process_weights(**options)
    return b


def tl_weights(b, cfg) -> dict[str, torch.Tensor]:
    """TransformerLens' processed weights under its names, keys and values per query head.
    The bridge's ``b_in``/``b_out`` accessors read the unprocessed module, so those two
    come from its state dict (what its forward runs on)."""
    out = {}
    for name in WEIGHTS:
        try:
            t = getattr(b, name)
        except (AttributeError, ValueError):
            continue  # no W_pos (rotary), no biases (Llama)
        if name in ("W_K", "W_V") and t.shape[1] != cfg.n_heads:
            t = t.repeat_interleave(cfg.n_heads // t.shape[1], 1)
        out[name] = t.detach()
    sd = b.state_dict()
    for ours, theirs in (("b_in", "mlp.in.bias"), ("b_out", "mlp.out.bias")):
        keys = [f"blocks.{layer}.{theirs}" for layer in range(cfg.n_layers)]
        if all(k in sd for k in keys):
            out[ours] = torch.stack([sd[k] for k in keys])
    if cfg.gated_mlp:
        out["W_gate"] = b.W_gate.detach()
    return out


def our_weights(model: resid.Model, names) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        if name == "W_gate":
            out[name] = torch.stack([blk.mlp.W_gate for blk in model.blocks])
        else:
            out[name] = getattr(model, name)
    return {k: v.detach() for k, v in out.items()}


def log_probs(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).log_softmax(-1)


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo", "pythia", "llama"])
def checkpoint(request, tmp_path_factory, tiny_hf, tiny_dir, tiny):
    """(family, hf model, bridge folder, resid model) on the same random weights."""
    if request.param == "gpt2":
        return "gpt2", tiny_hf, None, tiny
    hf = random_hf_family(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    save_tokenizer(folder)
    return request.param, hf, str(folder), resid.load(folder, device="cpu")


def test_default_processing_equals_transformer_lens(checkpoint):
    name, hf, folder, model = checkpoint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RMSNorm: center_writing_weights is skipped
        processed = process_weights(model)
    theirs = tl_weights(bridge(hf, folder), model.cfg)
    ours = our_weights(processed, theirs)
    assert len(theirs) >= (6 if name == "llama" else 15), sorted(theirs)
    worst = {k: (ours[k] - theirs[k]).abs().max().item() for k in theirs}
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    assert max(worst.values()) <= 1e-5, worst
    # the function is kept: log-probabilities equal (logits up to a constant per position)
    assert (log_probs(processed) - log_probs(model)).abs().max() <= 1e-4
    with torch.no_grad():
        theirs_logits = bridge(hf, folder)(TOKENS)
        assert (processed(TOKENS) - theirs_logits).abs().max() <= 1e-4
    # the loaded model is untouched, its twin records what was done
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.cfg.processing == ()
    rms = model.cfg.normalization == "RMS"
    steps = tuple(s for s in OPTIONS if not (rms and s == "center_writing_weights"))
    assert processed.cfg.processing == steps
    kind = RMSPre if rms else LNPre
    norms = (
        [processed.ln_final] + [b.ln1 for b in processed.blocks] + [b.ln2 for b in processed.blocks]
    )
    assert all(isinstance(n, kind) and not list(n.parameters()) for n in norms)
    assert not any(".ln" in k or "ln_final" in k for k in processed.state_dict())


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_alone_equals_transformer_lens(tiny_hf, tiny, option):
    options = {o: o == option for o in OPTIONS}
    processed = process_weights(tiny, **options)
    theirs = tl_weights(bridge(tiny_hf, None, **options), tiny.cfg)
    ours = our_weights(processed, theirs)
    worst = {k: (ours[k] - theirs[k]).abs().max().item() for k in theirs}
    assert max(worst.values()) <= 1e-5, worst
    assert (log_probs(processed) - log_probs(tiny)).abs().max() <= 1e-4
    assert processed.cfg.processing == (option,)
    assert processed.cfg.normalization == ("LNPre" if option == "fold_ln" else "LN")


def test_laws_of_each_step(tiny):
    """What each step promises, measured on its own result."""
    p = process_weights(tiny)
    d = tiny.cfg.d_model
    for name in ("W_E", "W_pos", "W_O", "b_O", "W_out", "b_out"):  # written: mean-free
        assert getattr(p, name).mean(-1).abs().max() < 1e-6, name
    for name in ("W_Q", "W_K", "W_V", "W_in"):  # read after LayerNorm: centred columns
        assert getattr(p, name).mean(-2).abs().max() < 1e-6, name
    assert p.W_U.mean(-1).abs().max() < 1e-6 and p.b_U.mean().abs() < 1e-6
    assert torch.equal(p.b_V, torch.zeros_like(p.b_V))
    # the centred unembedding shifts every logit of a position by the same amount
    with torch.no_grad():
        shift = p(TOKENS) - tiny(TOKENS)
    assert (shift - shift.mean(-1, keepdim=True)).abs().max() < 1e-4
    assert p.ln_final.w.shape == (d,) and torch.equal(p.ln_final.w, torch.ones(d))


def test_refactor_factored_attn_matrices_equals_transformer_lens(tiny_hf, tiny):
    """SVD factors are unique only up to signs, so the circuits are compared: each head's
    QK with its biases ([W_Q; b_Q][W_K; b_K]ᵀ) and OV (W_V W_O), and the output."""
    options = dict(refactor_factored_attn_matrices=True)
    processed = process_weights(tiny, **options)
    b = bridge(tiny_hf, None, **options)

    def qk(m):
        Q = torch.cat([m.W_Q, m.b_Q[:, :, None]], 2)
        K = torch.cat([m.W_K, m.b_K[:, :, None]], 2)
        return Q.detach() @ K.detach().mT

    assert (qk(processed) - qk(b)).abs().max() <= 1e-5
    ov = (processed.W_V @ processed.W_O - b.W_V @ b.W_O).abs().max()
    assert ov <= 1e-5
    assert (processed.b_O - b.b_O).abs().max() <= 1e-5
    # the laws: W_O's rows orthonormal per head, Q and K columns of equal norms
    eye = torch.eye(tiny.cfg.d_head)
    assert (processed.W_O @ processed.W_O.mT - eye).abs().max() < 1e-4
    Q = torch.cat([processed.W_Q, processed.b_Q[:, :, None]], 2)
    K = torch.cat([processed.W_K, processed.b_K[:, :, None]], 2)
    torch.testing.assert_close(Q.norm(dim=-2), K.norm(dim=-2), atol=1e-4, rtol=1e-4)
    assert (log_probs(processed) - log_probs(tiny)).abs().max() <= 1e-4
    assert processed.cfg.processing[-1] == "refactor_factored_attn_matrices"


def test_refusals_and_idempotence(checkpoint):
    name, _, _, model = checkpoint
    if model.cfg.positional == "rotary":
        with pytest.raises(ValueError, match="rotary"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            process_weights(model, refactor_factored_attn_matrices=True)
    if model.cfg.normalization == "RMS":
        with pytest.warns(UserWarning, match="center_writing_weights needs LayerNorm"):
            process_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once = process_weights(model)
        twice = process_weights(once)  # every step already done: nothing changes
    assert twice.cfg == once.cfg
    a, b = once.state_dict(), twice.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="resid.Model"):
        process_weights(object())


def test_processed_model_is_faithful_and_caches(tiny):
    """The processed model is a resid Model like any other: observing changes nothing, and
    hook_normalized is the normalised stream, now also the norm's output."""
    p = process_weights(tiny)
    tokens = TOKENS % tiny.cfg.d_vocab
    with torch.no_grad():
        logits, cache = p.run_with_cache(tokens)
        plain = p(tokens)
    assert torch.equal(logits, plain)
    x = cache["blocks.1.hook_resid_pre"]
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / (centred.pow(2).mean(-1, keepdim=True) + tiny.cfg.layer_norm_eps).sqrt()
    torch.testing.assert_close(cache["blocks.1.ln1.hook_normalized"], expected)


# ---- SAEs trained on processed weights -----------------------------------------------


def sae_with(kwargs: dict | None, flat: bool = False):
    """An SAE at blocks.1.hook_resid_pre of the tiny model, whose cfg.json states
    ``model_from_pretrained_kwargs`` as SAELens 6 (in metadata) or earlier (flat) wrote it."""
    from resid.sae import SAE, SAEConfig

    cfg = {"d_in": 64, "d_sae": 32, "metadata": {"hook_name": "blocks.1.hook_resid_pre"}}
    if kwargs is not None:
        (cfg if flat else cfg["metadata"])["model_from_pretrained_kwargs"] = kwargs
    torch.manual_seed(0)
    sae = SAE(SAEConfig.from_dict(cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    return sae


def splice_warnings(model, sae) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), model.saes([sae]):
            model(TOKENS % model.cfg.d_vocab)
    return [str(w.message) for w in caught if "trained on a model" in str(w.message)]


@pytest.mark.parametrize("flat", [False, True])
def test_sae_processing_metadata_warns_and_processes_on_request(tiny, tmp_path, flat):
    import resid.sae as rsae

    tl_defaults = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}
    sae = sae_with(tl_defaults, flat=flat)
    assert rsae.expected_processing(sae.cfg) == tl_defaults
    # spliced into the exact weights: a warning naming each flag and the fix
    (message,) = splice_warnings(tiny, sae)
    assert "fold_ln=True" in message and "processed_for" in message
    # processed on request: the flags the file states, and then no warning
    matched = rsae.processed_for(sae, tiny)
    assert set(matched.cfg.processing) == set(tl_defaults)
    assert splice_warnings(matched, sae) == []
    assert rsae.processed_for(sae, matched) is matched
    # the metadata survives saving and loading in SAELens' format
    rsae.save(sae, tmp_path / "sae")
    again = rsae.load(tmp_path / "sae")
    assert rsae.expected_processing(again.cfg) == tl_defaults


def test_sae_processing_metadata_only_what_is_stated(tiny):
    import resid.sae as rsae

    assert splice_warnings(tiny, sae_with(None)) == []  # nothing stated: nothing to check
    assert splice_warnings(tiny, sae_with({"center_writing_weights": False})) == []
    no_centring = sae_with({"center_writing_weights": False})
    processed = process_weights(tiny)  # has center_writing_weights
    (message,) = splice_warnings(processed, no_centring)
    assert "center_writing_weights=False" in message
    with pytest.raises(rsae.SAEError, match="cannot be undone"):
        rsae.processed_for(no_centring, processed)
    with pytest.raises(rsae.SAEError, match="true or false"):
        rsae.expected_processing(sae_with({"fold_ln": "yes"}).cfg)


def test_save_refuses_a_processed_model(tiny, tmp_path):
    with pytest.raises(ValueError, match="were processed"):
        resid.save(process_weights(tiny), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_direct_logit_attribution_on_a_processed_model(tiny):
    """resid's analyses run on the processed model: DLA's parts sum to the logit less b_U
    (which now holds ln_final's folded bias), and a logit difference is the exact model's."""
    p = process_weights(tiny)
    tokens = TOKENS % tiny.cfg.d_vocab
    with torch.no_grad():
        logits, cache = p.run_with_cache(tokens)
        exact_logits, exact = tiny.run_with_cache(tokens)
    dla = cache.logit_attribution(17)
    torch.testing.assert_close(dla.sum(), logits[..., 17] - p.b_U[17], atol=1e-4, rtol=0)
    diff = cache.logit_attribution((17, 5)).sum() + p.b_U[17] - p.b_U[5]
    torch.testing.assert_close(diff, exact.logit_attribution((17, 5)).sum(), atol=1e-4, rtol=0)
