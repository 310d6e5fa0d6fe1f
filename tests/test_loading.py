"""Every checkpoint layout GPT-2 ships in, loaded through resid.load and checked against
the logits of the Hugging Face model the file was written from; and every way a file can
be wrong."""

import dataclasses
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TINY, make_hf_gpt2
from processes import timed_loads

import resid
from resid import CheckpointError
from resid.core.tokenizer import Tokenizer
from resid.io import checkpoint

TOKENS = torch.tensor([[50256, 464, 3797, 3332, 319, 262, 2603, 13]])


def run_cli(*argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resid", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


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


# ---- 4-6. checkpoints validated before anything is allocated -----------------------------------


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def set_config(**changes):
    def mutate(folder: Path):
        cfg = _config(folder)
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    return mutate


def write_config(text: str):
    def mutate(folder: Path):
        (folder / "config.json").write_text(text)

    return mutate


def edit_weights(fn):
    def mutate(folder: Path):
        sd = safetensors.torch.load_file(str(folder / "model.safetensors"))
        fn(sd)
        safetensors.torch.save_file(sd, str(folder / "model.safetensors"))

    return mutate


def _set(name, value):
    def fn(sd):
        sd[name] = value(sd[name]) if callable(value) else value

    return fn


def _nan_at(name, where=(0,), value=math.nan):
    def fn(sd):
        t = sd[name].clone()
        t.view(-1)[where[0]] = value
        sd[name] = t

    return fn


def _tied_nan(sd):
    t = sd["transformer.wte.weight"].clone()
    t[3, 2] = math.nan
    sd["transformer.wte.weight"] = t
    sd["lm_head.weight"] = t.clone()


def shards(names: list[str], prepare=None):
    """A sharded checkpoint: the weights split over files named ``names`` in the index."""

    def mutate(folder: Path):
        sd = safetensors.torch.load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        keys = sorted(sd)
        weight_map = {}
        for i, name in enumerate(names):
            part = {k: sd[k] for k in keys[i :: len(names)]}
            weight_map |= dict.fromkeys(part, name)
            target = (folder / name) if not os.path.isabs(name) else Path(name)
            if prepare is None and not name.startswith(("/dev", "..")):
                target.parent.mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_file(part, str(target))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        if prepare:
            prepare(folder, sd, keys, names)

    return mutate


def _outside(folder, sd, keys, names):
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    safetensors.torch.save_file({k: sd[k] for k in keys[1::2]}, str(elsewhere / "x.safetensors"))
    safetensors.torch.save_file({k: sd[k] for k in keys[0::2]}, str(folder / "a.safetensors"))


def _fifo_shard(folder, sd, keys, names):
    safetensors.torch.save_file({k: sd[k] for k in keys[0::2]}, str(folder / "a.safetensors"))
    os.mkfifo(folder / "b.safetensors")


def _symlink_out(folder, sd, keys, names):
    _outside(folder, sd, keys, names)
    (folder / "b.safetensors").symlink_to(folder.parent / "elsewhere" / "x.safetensors")


def _fifo_config(folder: Path):
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


def _huge_config(folder: Path):
    cfg = _config(folder)
    cfg["padding"] = "x" * (17 << 20)
    (folder / "config.json").write_text(json.dumps(cfg))


def _header_lies(folder: Path):
    """A safetensors header declaring a tensor far larger than the file."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "transformer.h.0.ln_1.weight"
    header[name]["shape"] = [1 << 28]
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])


def _truncate(folder: Path):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def as_bin(obj_fn):
    def mutate(folder: Path):
        sd = safetensors.torch.load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save(obj_fn(sd), folder / "pytorch_model.bin")

    return mutate


def _storage_bomb(folder: Path):
    """A .bin whose pickle declares a 2 GB storage for a 4 kB record."""
    import struct
    import zipfile

    sd = safetensors.torch.load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    sd["transformer.ln_f.bias"] = torch.zeros(1000)
    torch.save(sd, folder / "small.bin")
    zin = zipfile.ZipFile(folder / "small.bin")
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"M\xe8\x03", b"J" + struct.pack("<i", 500_000_000))
            zout.writestr(name, data)
    zin.close()
    (folder / "small.bin").unlink()


def nanogpt(change=None, args_change=None, model_fn=None):
    def mutate(folder: Path):
        sd = safetensors.torch.load_file(str(folder / "model.safetensors"))
        cfg = _config(folder)
        for p in ("model.safetensors", "config.json"):
            (folder / p).unlink()
        conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
        model = {
            f"_orig_mod.{k}": v.T.contiguous() if k.endswith(conv1d) else v for k, v in sd.items()
        }
        args = dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                    block_size=cfg["n_positions"], bias=True, vocab_size=cfg["vocab_size"])  # fmt: skip
        if args_change is not None:
            args = args_change(args)
        if model_fn is not None:
            model = model_fn(model)
        torch.save({"model": model, "model_args": args, "iter_num": 1}, folder / "ckpt.pt")

    return mutate


def _args(**changes):
    return lambda args: {**args, **changes}


OK = None  # loads, with the same logits as the unmodified checkpoint
OK_EXACT_GELU = "ok: nanoGPT"  # loads, as the same weights with nanoGPT's exact GELU
VARIANTS = {
    # config.json: types and ranges
    "n_head 0": (set_config(n_head=0), "'n_head' must be a positive integer"),
    "n_head -4": (set_config(n_head=-4), "'n_head' must be a positive integer"),
    "n_layer '2'": (set_config(n_layer="2"), "'n_layer' must be a positive integer"),
    "n_layer 2.0": (set_config(n_layer=2.0), "'n_layer' must be a positive integer"),
    "n_layer null": (set_config(n_layer=None), "'n_layer' must be a positive integer"),
    "n_layer true": (set_config(n_layer=True), "'n_layer' must be a positive integer"),
    "n_layer 1e7": (set_config(n_layer=10_000_000), "asks for 10,000,000 blocks"),
    "n_layer 1": (set_config(n_layer=1), "unexpected keys"),
    "n_embd not a multiple of n_head": (set_config(n_embd=66), "not a multiple"),
    "n_embd '64'": (set_config(n_embd="64"), "'n_embd' must be a positive integer"),
    "vocab_size 0": (set_config(vocab_size=0), "'vocab_size' must be a positive integer"),
    "vocab_size 1e12": (set_config(vocab_size=10**12), "mis-shaped keys"),
    "n_positions -1": (set_config(n_positions=-1), "'n_positions' must be a positive integer"),
    "n_positions 1e15": (set_config(n_positions=10**15), "mis-shaped keys"),
    "n_inner 0": (set_config(n_inner=0), "'n_inner' must be a positive integer"),
    "n_inner '256'": (set_config(n_inner="256"), "'n_inner' must be a positive integer"),
    "eps -1": (set_config(layer_norm_epsilon=-1), "'layer_norm_epsilon' must be a positive"),
    "eps 0": (set_config(layer_norm_epsilon=0), "'layer_norm_epsilon' must be a positive"),
    "eps NaN": (set_config(layer_norm_epsilon=math.nan), "'layer_norm_epsilon' must be a positive"),
    "eps Infinity": (set_config(layer_norm_epsilon=math.inf), "'layer_norm_epsilon' must be"),
    "eps true": (set_config(layer_norm_epsilon=True), "'layer_norm_epsilon' must be a positive"),
    "eps 'small'": (set_config(layer_norm_epsilon="small"), "'layer_norm_epsilon' must be"),
    "config a list": (write_config("[2, 4, 64]"), "holds a JSON list"),
    "config a string": (write_config('"gpt2"'), "holds a JSON str"),
    "config not JSON": (write_config("{"), "not valid JSON"),
    "config a FIFO": (_fifo_config, "not a regular file"),
    "config 17 MB": (_huge_config, "far too large"),
    # a supported family's config over GPT-2's tensors: the keys that do not fit are named
    "model_type llama": (set_config(model_type="llama"), "missing keys"),
    "model_type bert": (set_config(model_type="bert"), "not an architecture resid supports"),
    "activation relu": (set_config(activation_function="relu"), "activation 'relu'"),
    "n_inner null": (set_config(n_inner=None), OK),
    "n_layer absent (GPT2Config's 12)": (lambda f: write_config(json.dumps(
        {k: v for k, v in _config(f).items() if k != "n_layer"}))(f), "asks for 12 blocks"),  # fmt: skip
    # weights
    "int32 weight": (edit_weights(_set("transformer.h.0.ln_1.weight", lambda t: t.int())), "non-floating"),
    "bool weight": (edit_weights(_set("transformer.ln_f.bias", lambda t: t > 0)), "non-floating"),
    "NaN weight": (edit_weights(_nan_at("transformer.h.1.attn.c_attn.weight")), "non-finite weights (NaN or Inf) in h.1.attn.c_attn.weight"),
    "Inf weight": (edit_weights(_nan_at("transformer.ln_f.bias", value=math.inf)), "non-finite weights (NaN or Inf) in ln_f.bias"),
    "NaN in tied wte/lm_head": (edit_weights(_tied_nan), "non-finite weights (NaN or Inf) in wte.weight"),
    "lm_head differs": (edit_weights(lambda sd: sd.__setitem__("lm_head.weight", sd["transformer.wte.weight"] + 1)), "differs from wte.weight"),
    "missing key": (edit_weights(lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias")), "missing keys (1): h.1.mlp.c_fc.bias"),
    "extra key": (edit_weights(lambda sd: sd.__setitem__("transformer.h.0.extra", torch.zeros(2))), "unexpected keys (1): h.0.extra"),
    "mis-shaped key": (edit_weights(_set("transformer.ln_f.weight", torch.ones(65))), "ln_f.weight: expected [64], got [65]"),
    "prefixed and bare twice": (edit_weights(lambda sd: sd.__setitem__("wte.weight", sd["transformer.wte.weight"].clone())), "twice"),
    "block index 1e12": (edit_weights(lambda sd: sd.__setitem__("transformer.h.999999999999.ln_1.weight", torch.ones(64))), "unexpected keys"),
    "truncated safetensors": (_truncate, "not a readable safetensors file"),
    "safetensors header lies": (_header_lies, "not a readable safetensors file"),
    # shards
    "two shards": (shards(["a.safetensors", "b.safetensors"]), OK),
    "shard ../elsewhere": (shards(["a.safetensors", "../elsewhere/x.safetensors"], _outside), "outside the checkpoint folder"),
    "shard absolute": (shards(["a.safetensors", "/etc/passwd"], _outside), "must be relative"),
    "shard /dev/stdin": (shards(["a.safetensors", "/dev/stdin"], _outside), "must be relative"),
    "shard FIFO": (shards(["a.safetensors", "b.safetensors"], _fifo_shard), "not a regular file"),
    "shard symlinked outside": (shards(["a.safetensors", "b.safetensors"], _symlink_out), "outside the checkpoint folder"),
    "shard index weight_map a list": (lambda f: (shards(["a.safetensors"])(f), (f / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')), "no 'weight_map'"),
    # pickles
    "bin of a list": (as_bin(lambda sd: list(sd.values())), "holds a list"),
    "bin with an int key": (as_bin(lambda sd: {**sd, 3: torch.zeros(1)}), "3"),
    "bin with a string value": (as_bin(lambda sd: {**sd, "transformer.note": "hi"}), "not a tensor"),
    "bin declaring 2 GB": (_storage_bomb, ""),
    "bin, valid": (as_bin(lambda sd: sd), OK),
    # nanoGPT
    "nanoGPT valid": (nanogpt(), OK_EXACT_GELU),
    "nanoGPT model_args a list": (nanogpt(args_change=lambda a: list(a.values())), "not a dict of settings"),
    "nanoGPT n_layer 1e7": (nanogpt(args_change=_args(n_layer=10_000_000)), "asks for 10,000,000 blocks"),
    "nanoGPT n_head 0": (nanogpt(args_change=_args(n_head=0)), "'n_head' must be a positive integer"),
    "nanoGPT n_layer '2'": (nanogpt(args_change=_args(n_layer="2")), "'n_layer' must be a positive integer"),
    "nanoGPT bias 'yes'": (nanogpt(args_change=_args(bias="yes")), "'bias' must be true or false"),
    "nanoGPT model a list": (nanogpt(model_fn=lambda m: list(m.values())), "not a state dict"),
    "nanoGPT block_size missing": (nanogpt(args_change=lambda a: {k: v for k, v in a.items() if k != "block_size"}), "'block_size' must be a positive integer"),
}  # fmt: skip


def test_there_are_at_least_40_malformed_variants():
    assert sum(expect not in (OK, OK_EXACT_GELU) for _, expect in VARIANTS.values()) >= 40


@pytest.mark.parametrize("name", list(VARIANTS))
def test_malformed_checkpoint(name, tiny_hf, tiny_dir, tmp_path):
    mutate, expect = VARIANTS[name]
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    mutate(folder)
    start = time.monotonic()
    if expect in (OK, OK_EXACT_GELU):
        with torch.no_grad():
            got = resid.load(folder, device="cpu")(TOKENS)
            if expect is OK:
                want = tiny_hf(TOKENS).logits
            else:
                cfg = dataclasses.replace(resid.load(tiny_dir, device="cpu").cfg, act_fn="gelu")
                want = resid.load(tiny_dir, device="cpu", config=cfg)(TOKENS)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        return
    try:
        resid.load(folder, device="cpu")
    except CheckpointError as e:
        assert expect in str(e), str(e)
    else:
        pytest.fail(f"{name}: loaded without a CheckpointError")
    assert time.monotonic() - start < 10


def test_nonfinite_weights_load_with_allow_nonfinite(tiny_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    edit_weights(_tied_nan)(folder)
    with pytest.warns(UserWarning, match="non-finite weights .* in wte.weight"):
        model = resid.load(folder, device="cpu", allow_nonfinite=True)
    assert model.W_E.isnan().sum() == 1


def test_n_layer_bombs_fail_fast_and_small(tiny_dir, tmp_path):
    hf_bomb = tmp_path / "hf"
    shutil.copytree(tiny_dir, hf_bomb)
    set_config(n_layer=10_000_000)(hf_bomb)
    nano_bomb = tmp_path / "nano"
    shutil.copytree(tiny_dir, nano_bomb)
    nanogpt(args_change=_args(n_layer=10_000_000))(nano_bomb)
    results = timed_loads([hf_bomb, nano_bomb / "ckpt.pt"], timeout=120)
    for r in results:
        assert r["error"] and "10,000,000 blocks" in r["error"], r
        assert r["seconds"] < 2 and r["extra_mb"] < 200, r
    print(json.dumps(results))


def test_cli_prints_one_line_for_a_bad_checkpoint(tiny_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    set_config(n_head=0)(folder)
    for command in ("info", "compare"):
        done = run_cli(command, folder, "--device", "cpu")
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"resid {command}: error: "), done.stderr
        assert "'n_head' must be a positive integer" in lines[0] and "config.json" in lines[0]


# ---- moved from test_safety.py: nanoGPT's padded vocabulary, compare reads once -------------


def test_nanogpt_padded_vocab_uses_gpt2s_tokenizer(tiny_hf, tmp_path):
    """nanoGPT pads GPT-2's 50257 ids to 50304 for speed: ids below 50257 are GPT-2's."""
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    model = {f"transformer.{k}": v.T.contiguous() if k.endswith(conv1d) else v.clone()
             for k, v in tiny_hf.transformer.state_dict().items()}  # fmt: skip
    wte = model["transformer.wte.weight"]
    model["transformer.wte.weight"] = torch.cat([wte, torch.zeros(50304 - 50257, wte.shape[1])])
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True, vocab_size=50304)
    torch.save({"model": model, "model_args": args}, tmp_path / "ckpt.pt")
    m = resid.load(tmp_path / "ckpt.pt", device="cpu")
    gpt2 = Tokenizer.gpt2()
    assert m.to_tokens("Hello world")[0].tolist() == [
        gpt2.bos_token_id,
        *gpt2.encode("Hello world"),
    ]
    assert m.to_str_tokens("Hello world") == ["<|endoftext|>", "Hello", " world"]


def test_compare_reads_a_single_file_once(tiny_dir, monkeypatch):
    from resid.io import compare as compare_module
    from resid.io import loading

    opened = []
    real = checkpoint.read_safetensors

    def counting(path, *a, **k):
        opened.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoint, "read_safetensors", counting)
    report = compare_module.compare(str(tiny_dir / "model.safetensors"), device="cpu")
    assert opened == ["model.safetensors"], opened
    assert report.ok
    assert loading.read  # the public reader the comparison goes through


# ---- names and paths (issue 24) ------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Any call to the hub fails the test: a path must never be sent there."""
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError(f"sent to the hub: {a}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.parametrize("name", ["./missing", "../missing", "/nowhere/missing", "~/missing",
                                  "models/missing", "out/run1/ckpt.pt", "weights.safetensors"])  # fmt: skip
def test_paths_are_never_sent_to_the_hub(name, no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        resid.load(name, device="cpu")
    msg = str(err.value)
    looked = Path(os.path.abspath(Path(name).expanduser()))
    assert f"no file or folder at {looked}" in msg
    assert f"python scripts/make_tiny_gpt2.py {name}" in msg


def test_an_existing_folder_named_like_a_hub_model_is_read_locally(
    tiny_dir, tmp_path, no_hub, monkeypatch
):
    (tmp_path / "openai-community").mkdir()
    shutil.copytree(tiny_dir, tmp_path / "openai-community" / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert resid.load("openai-community/gpt2", device="cpu").cfg.n_layers == 2


def test_hub_errors_mention_hf_hub_offline_only_when_it_is_set(monkeypatch):
    """With the variable unset, the advice is not to unset it; the stand-in script is named."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*a, **k):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    for offline in (None, "1"):
        if offline is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        with pytest.raises(CheckpointError) as err:
            resid.load("gpt2-medium", device="cpu")
        msg = str(err.value)
        assert ("HF_HUB_OFFLINE" in msg) == (offline is not None), msg
        assert "python scripts/make_tiny_gpt2.py DIR" in msg and "gpt2-medium" in msg


def test_moved_names_warn_and_still_work(tiny):
    from resid.io import families, loading

    for name, new in (("gpt2_shapes", "resid.io.families.gpt2"),
                      ("BLOCK_NAMES", "resid.io.families.gpt2"),
                      ("MAX_JSON_BYTES", "resid.io.checkpoint")):  # fmt: skip
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(loading, name)
    with pytest.warns(DeprecationWarning):
        shapes = loading.gpt2_shapes(tiny.cfg)
    assert shapes["h.0.attn.c_attn.weight"] == (64, 192) and len(shapes) == 4 + 12 * 2
    for name in (
        "SUPPORTED",
        "supported",
        "family_of",
        "config_from_hf",
        "strip_prefix",
        "to_resid",
    ):
        assert getattr(families, name)
    cfg = families.config_from_hf({"model_type": "llama", "hidden_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4})  # fmt: skip
    assert (cfg.normalization, cfg.n_layers, cfg.architecture) == ("RMS", 2, "llama")


# ---- lean loading --------------------------------------------------------------------------

LEAN_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, resid
    def status(key):  # bytes
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    resid.load(sys.argv[2], device="cpu")  # warm: imports, first calls
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from now
    now = status("VmRSS")
    model = resid.load(sys.argv[1], device="cpu", dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_over_start": status("VmHWM") - now, "bf16_bytes": weights,
                      "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
    """
)


def test_a_bfloat16_load_never_holds_the_float32_checkpoint(tiny_dir, tmp_path):
    """The law of a lean load: peak memory over the start ≤ 1.15 × the bf16 weights + 20 MB
    for a float32 checkpoint of 120 MB. Converting the whole checkpoint first (or holding
    it in float32 once) would need at least 120 MB + 60 MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=512, vocab_size=56000, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    size = (tmp_path / "llama" / "model.safetensors").stat().st_size
    assert size > 110e6
    done = subprocess.run([sys.executable, "-c", LEAN_SCRIPT, str(tmp_path / "llama"), str(tiny_dir)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["peak_over_start"] <= 1.15 * r["bf16_bytes"] + 20e6, r
    print(r)


def test_editing_a_loaded_model_never_changes_its_file(tiny_dir, tmp_path, tokens):
    """Weights already in the dtype asked are views of the file's private mapping (no copy):
    writing to them must stay in memory."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    before = (folder / "model.safetensors").read_bytes()
    model = resid.load(folder, device="cpu")
    with torch.no_grad():
        ref = model(tokens)
        for p in model.parameters():
            p.mul_(2.0)
    assert (folder / "model.safetensors").read_bytes() == before
    with torch.no_grad():
        torch.testing.assert_close(resid.load(folder, device="cpu")(tokens), ref, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_load_equals_the_cpu_load(tiny_dir, tokens, dtype):
    gpu = resid.load(tiny_dir, device="cuda", dtype=dtype)
    cpu = resid.load(tiny_dir, device="cpu", dtype=dtype)
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in gpu.parameters())
    for (n, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters(), strict=True):
        assert torch.equal(a.cpu(), b), n
    with torch.no_grad():
        torch.testing.assert_close(gpu(tokens.cuda()).float().cpu(), cpu(tokens).float(),
                                   atol=1e-4 if dtype == torch.float32 else 0.1, rtol=0)  # fmt: skip


def test_tokenizer_files_are_bounded_and_regular(tiny_dir, tmp_path):
    """A FIFO or a huge file where tokenizer.json should be is refused before it is read."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    os.mkfifo(folder / "tokenizer.json")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="not a regular file"):
        resid.load(folder, device="cpu")
    assert time.monotonic() - start < 10
    (folder / "tokenizer.json").unlink()
    with open(folder / "tokenizer.json", "wb") as f:
        f.truncate((256 << 20) + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="far too large"):
        resid.load(folder, device="cpu")
