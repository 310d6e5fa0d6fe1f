"""Every checkpoint layout GPT-2 ships in, loaded through resid.load and checked against
the logits of the Hugging Face model the file was written from; and every way a file can
be wrong."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from conftest import TINY, make_hf_gpt2

import resid
from resid import CheckpointError


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def resid_logits(path, tokens, **kw):
    with torch.no_grad():
        return resid.load(path, device="cpu", **kw)(tokens)


def gpt2_layout(hf) -> dict:
    """What the hub's `gpt2/model.safetensors` holds: no prefix, causal-mask buffers, no lm_head."""
    sd = {k: v.clone().contiguous() for k, v in hf.transformer.state_dict().items()}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n))
    return sd


def test_save_pretrained_folder(tiny_dir, tiny_hf, tokens):
    torch.testing.assert_close(
        resid_logits(tiny_dir, tokens), hf_logits(tiny_hf, tokens), atol=1e-4, rtol=0
    )


def test_hub_gpt2_layout_safetensors(tiny_hf, tokens, tmp_path):
    safetensors.torch.save_file(gpt2_layout(tiny_hf), tmp_path / "model.safetensors")
    tiny_hf.config.to_json_file(tmp_path / "config.json")
    ref = hf_logits(tiny_hf, tokens)
    torch.testing.assert_close(resid_logits(tmp_path, tokens), ref, atol=1e-4, rtol=0)
    # the same file named directly: config.json beside it is used
    torch.testing.assert_close(
        resid_logits(tmp_path / "model.safetensors", tokens), ref, atol=1e-4, rtol=0
    )


def test_old_bin_layout_with_prefix_mask_buffers_and_lm_head(tiny_hf, tokens, tmp_path):
    sd = {f"transformer.{k}": v for k, v in gpt2_layout(tiny_hf).items()}
    for i in range(2):
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    tiny_hf.config.to_json_file(tmp_path / "config.json")
    torch.testing.assert_close(
        resid_logits(tmp_path, tokens), hf_logits(tiny_hf, tokens), atol=1e-4, rtol=0
    )


def test_bare_file_guesses_heads_or_takes_a_config(tiny_hf, tokens, tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(gpt2_layout(tiny_hf), path)
    with pytest.warns(UserWarning, match="64-dimensional heads"):
        guessed = resid.load(path, device="cpu")
    assert (guessed.cfg.n_layers, guessed.cfg.d_model, guessed.cfg.n_ctx) == (2, 64, 64)
    cfg = resid.Config(n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=256, n_ctx=64)
    torch.testing.assert_close(
        resid_logits(path, tokens, config=cfg), hf_logits(tiny_hf, tokens), atol=1e-4, rtol=0
    )


def nanogpt_checkpoint(hf, bias: bool) -> dict:
    """nanoGPT's train.py checkpoint: nn.Linear weights [out, in], torch.compile's
    `_orig_mod.` prefix, a tied lm_head, and training state beside the model."""
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    model = {}
    for k, v in hf.transformer.state_dict().items():
        if not bias and k.endswith(".bias"):
            continue
        model[f"_orig_mod.transformer.{k}"] = v.T.contiguous() if k.endswith(conv1d) else v.clone()
    model["_orig_mod.lm_head.weight"] = model["_orig_mod.transformer.wte.weight"]
    c = hf.config
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                bias=bias, vocab_size=c.vocab_size, dropout=0.0)  # fmt: skip
    return {"model": model, "model_args": args, "optimizer": {"state": {}}, "iter_num": 5000,
            "best_val_loss": torch.tensor(2.5), "config": {"dataset": "shakespeare"}}  # fmt: skip


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_ckpt(tokens, tmp_path, bias):
    hf = make_hf_gpt2(seed=4, activation_function="gelu", **TINY)  # nanoGPT's GELU is exact
    if not bias:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    torch.save(nanogpt_checkpoint(hf, bias), tmp_path / "ckpt.pt")
    ref = hf_logits(hf, tokens)
    torch.testing.assert_close(resid_logits(tmp_path / "ckpt.pt", tokens), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(resid_logits(tmp_path, tokens), ref, atol=1e-4, rtol=0)


def test_dtype_and_meta_free(tiny_dir):
    model = resid.load(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model(model.to_tokens("Hello")).dtype == torch.bfloat16


# ---- what bad checkpoints get -----------------------------------------------------------


@pytest.fixture
def good_sd(tiny_hf):
    return gpt2_layout(tiny_hf)


def write_folder(tmp_path, sd, config):
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
    config.to_json_file(tmp_path / "config.json")
    return tmp_path


def test_missing_unexpected_and_misshaped_keys_are_listed(good_sd, tiny_hf, tmp_path):
    del good_sd["h.1.mlp.c_fc.bias"]
    good_sd["h.0.attn.rotary"] = torch.zeros(3)
    good_sd["h.0.mlp.c_fc.weight"] = good_sd["h.0.mlp.c_fc.weight"].T.contiguous()
    with pytest.raises(CheckpointError) as err:
        resid.load(write_folder(tmp_path, good_sd, tiny_hf.config), device="cpu")
    msg = str(err.value)
    assert "missing keys (1): h.1.mlp.c_fc.bias" in msg
    assert "unexpected keys (1): h.0.attn.rotary" in msg
    assert "h.0.mlp.c_fc.weight: expected [64, 256], got [256, 64]" in msg


def test_untied_lm_head_is_refused(good_sd, tiny_hf, tmp_path):
    good_sd["lm_head.weight"] = torch.randn_like(good_sd["wte.weight"])
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        resid.load(write_folder(tmp_path, good_sd, tiny_hf.config), device="cpu")


def test_truncated_safetensors(tiny_dir, tmp_path):
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="truncated"):
        resid.load(tmp_path, device="cpu")


@pytest.mark.parametrize("name", ["notes.txt", "model.bin", "model.safetensors"])
def test_file_that_is_not_a_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are my notes, not weights\n")
    with pytest.raises(CheckpointError, match="not a"):
        resid.load(path, device="cpu")


def test_pickle_of_non_tensors(tmp_path):
    torch.save({"wte.weight": torch.zeros(2, 2), "note": "hi"}, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        resid.load(tmp_path / "w.bin", device="cpu")


class Planted:
    """Unpickling this would create a file: the side effect the loader must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"wte.weight": torch.zeros(2, 2), "evil": Planted(marker)}
    path = tmp_path / "pytorch_model.bin"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        resid.load(path, device="cpu")
    assert not marker.exists()


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resid.load(tmp_path, device="cpu")


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="gpt2-medium"):
        resid.load("gpt5", device="cpu")


def test_not_gpt2_config(tiny_dir, tmp_path):
    """An unsupported architecture is refused naming what is supported; GPT-2 weights under a
    supported family's config are refused naming the keys that do not fit."""
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "bert"}))
    with pytest.raises(
        CheckpointError, match="not an architecture resid supports.*LlamaForCausalLM"
    ):
        resid.load(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="missing keys.*embed_tokens.weight"):
        resid.load(tmp_path, device="cpu")


def test_hub_name_offline_without_cache_says_how_to_fix(tmp_path):
    code = "import resid\ntry:\n    resid.load('gpt2')\nexcept resid.CheckpointError as e:\n    print(e)"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "no copy is in the local cache" in out.stdout, out.stderr
    assert "HF_HUB_OFFLINE" in out.stdout


def test_hub_name_from_cache(tiny_dir, tiny_hf, tokens, tmp_path):
    """A hub name is read from the huggingface_hub cache when it is there (offline)."""
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snapshot / f).write_bytes((tiny_dir / f).read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    code = (
        "import torch, resid\n"
        "m = resid.load('gpt2', device='cpu')\n"
        f"torch.save(m(torch.tensor({tokens.tolist()})), {str(tmp_path / 'out.pt')!r})"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(
        torch.load(tmp_path / "out.pt"), hf_logits(tiny_hf, tokens), atol=1e-4, rtol=0
    )
