"""Issue 11: nothing lost, nothing hangs. Fresh machines (no browser), hostile checkpoint
files, outputs that must not be deleted, and runs interrupted by signals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import resid
from resid import CheckpointError
from resid.core import files
from resid.core.tokenizer import Tokenizer
from resid.viz.attention_pages import write_attention
from resid.viz.plots import parse_indices

PROMPT = "The cat sat on the mat. The cat"
TOKENS = torch.tensor([[50256, 464, 3797, 3332, 319, 262, 2603, 13]])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256), symlinks not followed."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def hidden_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def run_cli(*argv, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resid", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)  # fmt: skip


# ---- 1. static image export: a browser is looked for first, and every call is bounded --------


def test_png_export_with_no_browser_skips_in_seconds(tiny_dir, tmp_path):
    """A fresh machine: no Chrome anywhere kaleido looks (BROWSER_PATH is what its finder
    reads first, so a missing path hides every installed browser). The run must finish, fast,
    with one line saying PNG was skipped and why, and the HTML written."""
    env = dict(os.environ, BROWSER_PATH=str(tmp_path / "no-chrome-here"),
               PATH=str(Path(sys.executable).parent))  # fmt: skip
    out = tmp_path / "attn"
    start = time.monotonic()
    done = run_cli("attention", tiny_dir, PROMPT, "--out", out, "--format", "html,png",
                   "--heads", "0", "--quiet", "--device", "cpu", env=env, timeout=60)  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"
    notes = [ln for ln in done.stderr.splitlines() if "PNG export skipped" in ln]
    assert len(notes) == 1 and "does not exist" in notes[0], done.stderr
    assert list(out.glob("*.png")) == [] and (out / "L0H0.html").is_file()


def test_a_hanging_browser_is_stopped(tiny, tmp_path, monkeypatch):
    """A browser that starts and never answers: the export is bounded by a timeout, the
    browser killed, and one line says so."""
    pid_file = tmp_path / "browser.pid"
    fake = tmp_path / "chrome"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    monkeypatch.setenv("RESID_EXPORT_TIMEOUT", "3")
    start = time.monotonic()
    _, _, notes = write_attention(tiny, PROMPT, tmp_path / "attn", layers="0", heads="0",
                                  formats=["html", "png"], progress=False)  # fmt: skip
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert len(notes) == 1 and "PNG export skipped" in notes[0], notes
    assert list((tmp_path / "attn").glob("*.png")) == []
    if pid_file.exists():  # kaleido started it: it must not outlive the export
        pid = int(pid_file.read_text())
        for _ in range(50):
            try:  # gone, or a zombie waiting to be reaped
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the hung browser was left running")


# ---- 3. resid.save replaces a checkpoint whole -------------------------------------------------


def test_save_leaves_no_stale_weights_or_tokenizer(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    resid.save(tiny, folder)
    assert (folder / "tokenizer.json").is_file()
    toy = resid.load(Path(__file__).parents[1] / "notebooks" / "toy-induction", device="cpu")
    resid.save(toy, folder)  # a model with no tokenizer of its own, over one with
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "resid-manifest.json"]  # fmt: skip
    again = resid.load(folder, device="cpu")
    tokens = torch.tensor([[127, 3, 5, 3, 5]])
    torch.testing.assert_close(again(tokens), toy(tokens), atol=0, rtol=0)


def test_save_refuses_a_folder_it_did_not_write(tiny, tiny_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"old weights")
    (folder / "tokenizer.json").write_text("{}")
    before = snapshot(folder)
    with pytest.raises(
        files.ForeignFilesError, match="pytorch_model.bin.*tokenizer.json|tokenizer"
    ):
        resid.save(tiny, folder)
    assert snapshot(folder) == before
    assert hidden_leftovers(tmp_path) == []


def test_save_writes_no_gpt2_ids_into_other_vocabularies(tiny, tmp_path):
    toy_dir = Path(__file__).parents[1] / "notebooks" / "toy-induction"
    committed = json.loads((toy_dir / "config.json").read_text())
    assert committed["vocab_size"] == 128 and "bos_token_id" not in committed
    assert files.foreign_files(toy_dir, "resid.save") == []  # its manifest matches its files
    toy = resid.load(toy_dir, device="cpu")
    resid.save(toy, tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert "bos_token_id" not in config and "eos_token_id" not in config
    resid.save(tiny, tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == Tokenizer.gpt2().bos_token_id


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)  # fork-safe: no OpenMP pool in the children
    import resid

    source, folder, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    a = resid.load(source, device="cpu")
    b = resid.load(source, device="cpu")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)
    tokens = torch.tensor([[50256, 464, 3797, 3332, 319, 262, 2603, 13]])
    with torch.no_grad():
        expected = {"a": a(tokens), "b": b(tokens)}

    def which():
        try:
            m = resid.load(folder, device="cpu")
        except Exception as e:
            return "broken: " + type(e).__name__ + ": " + str(e)[:200]
        with torch.no_grad():
            got = m(tokens)
        for name, want in expected.items():
            if torch.equal(got, want):
                return name
        return "neither"

    resid.save(a, folder)

    def forked_save(model):
        pid = os.fork()
        if pid == 0:
            try:
                resid.save(model, folder)
            finally:
                os._exit(0)
        return pid

    start = time.monotonic()  # how long a save takes in a forked child, start to exit
    os.waitpid(forked_save(b), 0)
    seconds = time.monotonic() - start
    rng = random.Random(1234)
    results = []
    for i in range(trials):
        old = which()
        new = "b" if old == "a" else "a"
        delay = rng.uniform(0, 1.3 * seconds)
        pid = forked_save(b if new == "b" else a)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        now = which()
        results.append({"delay": delay, "old": old, "new": new, "found": now})
    print(json.dumps({"save_seconds": seconds, "results": results}))
    """
)


def test_save_killed_at_random_moments_leaves_old_or_new(tiny_dir, tmp_path):
    script = tmp_path / "kill_saves.py"
    script.write_text(KILL_SCRIPT)
    folder = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, str(script), str(tiny_dir), str(folder), "20"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert len(results) == 20
    bad = [r for r in results if r["found"] not in (r["old"], r["new"])]
    assert bad == [], bad
    print(f"save took {report['save_seconds']:.3f} s; kept old {sum(r['found'] == r['old'] for r in results)},"
          f" got new {sum(r['found'] == r['new'] for r in results)}")  # fmt: skip


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


BOMB_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import resid
    from resid import CheckpointError
    out = {}
    for path in sys.argv[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        try:
            resid.load(path, device="cpu")
            error = None
        except CheckpointError as e:
            error = str(e)
        seconds = time.monotonic() - start
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        out[path] = {"seconds": seconds, "extra_rss_mb": extra / 1024, "error": error}
    print(json.dumps(out))
    """
)


def test_n_layer_bombs_fail_fast_and_small(tiny_dir, tmp_path):
    hf_bomb = tmp_path / "hf"
    shutil.copytree(tiny_dir, hf_bomb)
    set_config(n_layer=10_000_000)(hf_bomb)
    nano_bomb = tmp_path / "nano"
    shutil.copytree(tiny_dir, nano_bomb)
    nanogpt(args_change=_args(n_layer=10_000_000))(nano_bomb)
    script = tmp_path / "bomb.py"
    script.write_text(BOMB_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(hf_bomb), str(nano_bomb / "ckpt.pt")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for path, r in results.items():
        assert r["error"] and "10,000,000 blocks" in r["error"], (path, r)
        assert r["seconds"] < 2 and r["extra_rss_mb"] < 200, (path, r)
    print(json.dumps(results))


def test_a_range_of_ten_billion_heads_is_refused_at_once():
    start = time.monotonic()
    with pytest.raises(
        ValueError, match="head 10000000000 is out of range: this model has heads 0-11"
    ):
        parse_indices("0-10000000000", 12, "head")
    assert time.monotonic() - start < 1


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


# ---- 8-10 -----------------------------------------------------------------------------------


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
    real = safetensors.torch.load_file

    def counting(path, *a, **k):
        opened.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "load_file", counting)
    report = compare_module.compare(str(tiny_dir / "model.safetensors"), device="cpu")
    assert opened == ["model.safetensors"], opened
    assert report.ok
    assert loading.read  # the public reader the comparison goes through


def test_half_precision_tolerance_follows_the_formats_epsilon():
    from resid.io.compare import tolerance

    bf16_eps, f16_eps = 2.0**-7, 2.0**-10  # IEEE-style formats: 8 and 11 significand bits
    _, bf16 = tolerance(torch.bfloat16, 12)
    _, f16 = tolerance(torch.float16, 12)
    assert f16 / bf16 == pytest.approx(f16_eps / bf16_eps)
    assert 1 <= bf16 / bf16_eps <= 8, "a handful of ulps at the logit scale"
    _, shallow = tolerance(torch.bfloat16, 2)
    assert shallow < bf16, "deeper models accumulate more rounding"
