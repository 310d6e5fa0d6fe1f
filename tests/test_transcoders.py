"""Transcoders: the computation against a plain formula, splicing (both sites, the error
term, hook points, gradients), features, circuit-tracer's and SAELens' file formats
written by hand here, and bad files or sites refused with nothing attached."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import resid
from resid.core.config import Config
from resid.sae import SAEError, Transcoder, TranscoderConfig, load_transcoders, save_transcoders

CFG = Config(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, d_vocab=60, n_ctx=24)


def model():
    torch.manual_seed(0)
    m = resid.Model(CFG)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if name.endswith(".w") else 0.0, 0.3 if p.dim() > 1 else 0.1)
    return m.eval()


def transcoder(layer=1, read="ln2.hook_normalized", arch="relu", skip=True, seed=1):
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in=32, d_sae=40, d_out=32, hook_name=f"blocks.{layer}.{read}",
                                     hook_name_out=f"blocks.{layer}.hook_mlp_out",
                                     architecture=arch, skip=skip, k=5 if arch == "topk" else None))  # fmt: skip
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0.0, 0.3)
    return tc


def plain(tc, x):
    """The transcoder as a formula, written out here."""
    pre = x @ tc.W_enc + tc.b_enc
    if tc.cfg.architecture == "jumprelu":
        acts = pre * (pre > tc.threshold)
    else:
        acts = torch.relu(pre)
    out = acts @ tc.W_dec + tc.b_dec
    return out + x @ tc.W_skip if tc.cfg.skip else out


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
@pytest.mark.parametrize("skip", [True, False])
def test_forward_is_the_formula(arch, skip):
    tc = transcoder(arch=arch, skip=skip)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(tc(x), plain(tc, x), atol=1e-5)
    top = transcoder(arch="topk", skip=False)
    assert ((top.encode(x) > 0).sum(-1) <= 5).all()


@pytest.mark.parametrize("read", ["ln2.hook_normalized", "hook_resid_mid", "hook_mlp_in"])
def test_splice_reads_one_site_writes_another_and_keeps_the_logits(read):
    m = model()
    tc = transcoder(read=read)
    tokens = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(tokens)
        with m.saes([tc]):
            got, cache = m.run_with_cache(tokens)
            assert tc.name_of("hook_acts") in m.hook_dict
        assert tc.name_of("hook_acts") not in m.hook_dict and not m.has_hooks()
        _, ref = m.run_with_cache(tokens, names_filter=[tc.hook_name, "blocks.1.hook_mlp_out"])
        no_error = m.run_with_saes(tokens, [tc], use_error_term=False)
    assert torch.equal(got, want)
    x = ref[tc.hook_name]
    assert torch.allclose(cache[tc.name_of("hook_recons")], plain(tc, x), atol=1e-5)
    assert torch.allclose(cache[tc.name_of("hook_error")], ref["blocks.1.hook_mlp_out"] - plain(tc, x), atol=1e-5)  # fmt: skip
    # without the error term, the MLP's output is the transcoder's: replace it by hand
    by_hand = m.run_with_hooks(
        tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda out, hook: plain(tc, x).detach())]
    )
    assert torch.allclose(no_error, by_hand, atol=1e-5)
    f = tc.feature(3, m)
    assert torch.allclose(f.activation(cache), torch.relu(x @ tc.W_enc[:, 3] + tc.b_enc[3]), atol=1e-5)  # fmt: skip
    assert torch.equal(f.write, tc.W_dec[3]) and torch.equal(f.read, tc.W_enc[:, 3])


def test_spliced_gradient_reaches_features_and_the_stream_once():
    m = model()
    tc = transcoder()
    tokens = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(2))
    got = {}
    with m.saes([tc]):
        loss = m.run_with_hooks(
            tokens,
            return_type="loss",
            bwd_hooks=[
                (tc.name_of("hook_acts"), lambda g, hook: got.__setitem__("acts", g)),
                ("blocks.1.hook_resid_mid", lambda g, hook: got.__setitem__("mid", g)),
            ],
        )
        loss.backward()
    plain_grads = {}
    m.zero_grad()
    loss2 = m.run_with_hooks(tokens, return_type="loss",
                             bwd_hooks=[("blocks.1.hook_resid_mid", lambda g, hook: plain_grads.__setitem__("mid", g)),
                                        ("blocks.1.hook_mlp_out", lambda g, hook: plain_grads.__setitem__("out", g))])  # fmt: skip
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert torch.allclose(got["mid"], plain_grads["mid"], atol=1e-6)  # as unspliced
    assert torch.allclose(got["acts"], plain_grads["out"] @ tc.W_dec.T, atol=1e-5)


def test_circuit_tracer_format_round_trip_and_layout(tmp_path):
    tcs = [transcoder(layer=i, seed=i) for i in range(2)]
    out = save_transcoders(tcs, tmp_path / "tcs")
    raw = load_file(str(out / "layer_1.safetensors"))
    assert set(raw) == {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip"}
    x = torch.randn(4, 32)
    # circuit-tracer's formula: relu(x W_enc^T + b_enc) W_dec + b_dec + x W_skip^T
    ct = (
        torch.relu(x @ raw["W_enc"].T + raw["b_enc"]) @ raw["W_dec"]
        + raw["b_dec"]
        + x @ raw["W_skip"].T
    )
    back = load_transcoders(out)
    assert [t.layer for t in back] == [0, 1]
    assert torch.allclose(back[1](x), ct, atol=1e-5) and torch.allclose(tcs[1](x), ct, atol=1e-5)
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("ln2.hook_normalized", "mlp.hook_in"))  # fmt: skip
    with pytest.raises(SAEError, match="gain"):
        load_transcoders(out)


def test_saelens_transcoder_folder(tmp_path):
    folder = tmp_path / "tc"
    folder.mkdir()
    torch.manual_seed(3)
    w = {"W_enc": torch.randn(32, 40), "W_dec": torch.randn(40, 32), "b_enc": torch.randn(40),
         "b_dec": torch.randn(32), "W_skip": torch.randn(32, 32)}  # fmt: skip
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "skip_transcoder", "d_in": 32, "d_sae": 40, "d_out": 32,
           "hook_name_out": "blocks.0.hook_mlp_out", "metadata": {"hook_name": "blocks.0.hook_resid_mid"}}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (tc,) = load_transcoders(folder)
    x = torch.randn(5, 32)
    # SAELens' SkipTranscoder: relu(x W_enc + b_enc) W_dec + b_dec + x W_skip^T
    want = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    assert torch.allclose(tc(x), want, atol=1e-4)
    # a JumpReLU transcoder: the threshold gates each feature
    jump = tmp_path / "jump"
    jump.mkdir()
    thr = torch.rand(40)
    save_file({k: v for k, v in w.items() if k != "W_skip"} | {"threshold": thr},
              str(jump / "sae_weights.safetensors"))  # fmt: skip
    (jump / "cfg.json").write_text(json.dumps(cfg | {"architecture": "jumprelu_transcoder"}))
    (tj,) = load_transcoders(jump)
    pre = x @ w["W_enc"] + w["b_enc"]
    want = (pre * (pre > thr)) @ w["W_dec"] + w["b_dec"]
    assert torch.allclose(tj(x), want, atol=1e-4) and not tj.cfg.skip
    cfg["architecture"] = "standard"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="not a SAELens transcoder"):
        load_transcoders(folder)


def test_bad_files_and_sites_are_clear_errors(tmp_path):
    out = save_transcoders([transcoder(layer=0)], tmp_path / "tcs")
    raw = load_file(str(out / "layer_0.safetensors"))
    save_file({**raw, "W_dec": raw["W_dec"][:, :5].contiguous()}, str(out / "layer_0.safetensors"))
    with pytest.raises(SAEError, match="W_dec"):
        load_transcoders(out)
    save_file({**raw, "b_dec": raw["b_dec"] * float("nan")}, str(out / "layer_0.safetensors"))
    with pytest.raises(SAEError, match="finite"):
        load_transcoders(out)
    (out / "config.yaml").write_text(
        "model_kind: transcoder_set\ntranscoders:\n- ../../etc/passwd\n"
    )
    with pytest.raises(Exception, match="passwd|outside|\\.\\."):
        load_transcoders(out)
    with pytest.raises(SAEError, match="not a folder"):
        load_transcoders(tmp_path / "missing")
    m = model()
    far = transcoder(layer=5)
    with pytest.raises((SAEError, KeyError)):
        with m.saes([far]):
            pass
    with pytest.raises(SAEError, match="one block"):
        TranscoderConfig(d_in=4, d_sae=4, d_out=4, hook_name="blocks.0.hook_resid_mid",
                         hook_name_out="blocks.1.hook_mlp_out")  # fmt: skip
    assert not m.has_hooks()


def test_circuit_tracer_mlp_hook_in_transcoders_fold_the_gain(tmp_path):
    m = model()
    with torch.no_grad():
        m.blocks[1].ln2.b.normal_(0, 0.5)
    out = save_transcoders(
        [transcoder(layer=0, seed=4), transcoder(layer=1, seed=5)], tmp_path / "t"
    )
    text = (out / "config.yaml").read_text().replace("ln2.hook_normalized", "mlp.hook_in")
    (out / "config.yaml").write_text(text)
    raw = load_file(str(out / "layer_1.safetensors"))
    tcs = load_transcoders(out, model=m)
    assert tcs[1].hook_name == "blocks.1.ln2.hook_normalized"
    tokens = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens, names_filter=["blocks.1.ln2.hook_normalized"])
        n = cache["blocks.1.ln2.hook_normalized"]
        ln = m.blocks[1].ln2
        mlp_in = n * ln.w + ln.b  # what circuit-tracer's mlp.hook_in sees
        pre = mlp_in @ raw["W_enc"].T + raw["b_enc"]
        want = torch.relu(pre) @ raw["W_dec"] + raw["b_dec"] + mlp_in @ raw["W_skip"].T
        assert torch.allclose(tcs[1].encode_pre(n), pre, atol=1e-4)
        assert torch.allclose(tcs[1](n), want, atol=1e-4)
