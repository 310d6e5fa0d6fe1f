"""Loading benchmarks: ``resid.load`` against ``transformers``' ``from_pretrained`` of the same
folder, in time (warm, interleaved runs, medians: ``bench.py``'s load measure) and in peak
host memory (each load in a fresh process: peak resident set over the process's resident
set just before the load, and the absolute peak).

    python scripts/bench_load.py time /work/cache/smollm2-st           # a safetensors folder
    python scripts/bench_load.py time /tmp/weights-only                  # ... without tokenizer files
    python scripts/bench_load.py make-llama /work/cache/llama1b          # ~1.1B random Llama
    python scripts/bench_load.py rss /work/cache/llama1b --dtype bfloat16

``make-llama`` writes TinyLlama-1.1B's shapes (22 layers, width 2048, 32 heads sharing 4
key/value heads, MLP 5632, vocabulary 32000, untied) with random float32 weights, in
shards of about 1 GB with a ``model.safetensors.index.json``, one tensor at a time. The
bound from issue 22 is peak RSS ≤ 1.15 × the bf16 weights' bytes + 400 MB.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from bench_timing import compare, show
from transformers import AutoModelForCausalLM, AutoTokenizer

import resid
from resid.io import checked

RSS_SCRIPT = """
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "resid":
    import resid
    load = lambda: resid.load(path, device="cpu", dtype=dtype)
else:
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS")
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"which": which, "seconds": seconds, "weights": weights, "start": start,
                  "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


def make_llama(folder: Path, shard_bytes: int = 1 << 30) -> None:
    """A random ~1.1B-parameter Llama checkpoint, written shard by shard."""
    d, layers, heads, kv, m, V = 2048, 22, 32, 4, 5632, 32000
    e = d // heads
    shapes = {
        "model.embed_tokens.weight": (V, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (V, d),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * e, d),
                   p + "self_attn.v_proj.weight": (kv * e, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
                   p + "mlp.down_proj.weight": (d, m), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            safetensors.torch.save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for key, shape in shapes.items():
        if len(shape) == 1:
            shard[key] = torch.ones(shape)
        else:
            shard[key] = torch.randn(shape, generator=g) * 0.02
        size += shard[key].numel() * 4
        if size >= shard_bytes:
            flush()
    flush()
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}  # transformers needs both
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "intermediate_size": m, "vocab_size": V,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "float32"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    print(
        f"wrote {sum(map(lambda s: __import__('math').prod(s), shapes.values())):,} parameters to {folder}"
    )


def rss(folder: Path, dtype: str) -> None:
    rows = []
    for which in ("resid", "transformers"):
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, which, str(folder), dtype],
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
        if done.returncode:
            print(which, "failed:", done.stderr[-2000:])
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        bound = 1.15 * r["weights"] + 400e6
        print(f"{which:>12}: {dtype} load {r['seconds']:.1f} s, weights {r['weights'] / 1e9:.2f} GB, "
              f"peak RSS {r['peak'] / 1e9:.2f} GB ({(r['peak'] - r['start']) / 1e9:.2f} GB over the "
              f"{r['start'] / 1e9:.2f} GB before the load); bound 1.15 × weights + 400 MB = "
              f"{bound / 1e9:.2f} GB over the start")  # fmt: skip
    print(json.dumps(rows))


def folder_loads(folder: str, device: str, runs: int, tokenizer: bool) -> dict[str, dict]:
    """``resid.load`` of a saved folder against ``from_pretrained`` (and ``AutoTokenizer``
    where the folder has a tokenizer; then also resid on the same folder without its
    tokenizer files, the work ``from_pretrained`` alone does). resid reads every value of
    a checkpoint it has not seen to refuse NaN and Inf (transformers reads none at load)
    and keeps a record of files found clean (``resid.io.checked``): "resid.load" is a
    later load, "first load" one with a fresh records folder every time."""
    records, fresh = tempfile.mkdtemp(prefix="resid-bench-"), itertools.count()
    saved = os.environ.get("RESID_CACHE")

    def resid_load(first: bool, where: str = folder) -> Callable[[], object]:
        def run():
            os.environ["RESID_CACHE"] = os.path.join(
                records, f"first-{next(fresh)}" if first else "kept"
            )
            return resid.load(where, device=device)

        return run

    fns = {"resid.load": resid_load(False), "resid.load, first load": resid_load(True),
           "HF from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(folder).to(device)}  # fmt: skip
    if tokenizer:
        fns["HF from_pretrained + AutoTokenizer"] = lambda: (
            AutoModelForCausalLM.from_pretrained(folder).to(device), AutoTokenizer.from_pretrained(folder))  # fmt: skip
        bare = os.path.join(records, "weights-only")  # the same files but the tokenizer's
        os.mkdir(bare)
        for name in os.listdir(folder):
            if not name.startswith("tokenizer"):
                os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(bare, name))
        fns["resid.load, no tokenizer files"] = resid_load(False, bare)
        fns["resid.load, no tokenizer files, first load"] = resid_load(True, bare)
    time.sleep(checked.MARGIN_NS / 1e9 + 0.1)  # files written just now are never recorded
    try:
        return compare(fns, runs, device, memory=False)
    finally:
        if saved is None:
            del os.environ["RESID_CACHE"]
        else:
            os.environ["RESID_CACHE"] = saved
        shutil.rmtree(records)


def save_folder(hf, gguf: str, folder: str) -> None:
    """transformers' model of a GGUF file and its tokenizer as a plain safetensors folder
    (its ``save_pretrained`` refuses a model loaded from GGUF)."""
    config = copy.deepcopy(hf.config)
    config.__dict__.pop("quantization_config", None)
    config.save_pretrained(folder)
    tied = config.tie_word_embeddings
    state = {
        k: v.contiguous()
        for k, v in hf.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    safetensors.torch.save_file(state, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    gguf_dir, name = os.path.split(os.path.abspath(gguf))
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name).save_pretrained(folder)


def timing(folder: Path, repeats: int) -> None:
    """bench.py's folder-load measure alone: resid's later and first loads of ``folder``
    against ``from_pretrained`` (and ``AutoTokenizer``), interleaved, medians."""
    warnings.simplefilter("ignore")
    has_tokenizer = (folder / "tokenizer.json").is_file()
    r = folder_loads(str(folder), "cpu", repeats, tokenizer=has_tokenizer)
    show(f"load {folder}", r)
    m = {k: v["wall_s"] for k, v in r.items()}
    hf = m["HF from_pretrained"]
    print(f"resid.load / from_pretrained: {m['resid.load'] / hf:.2f}x "
          f"(first load {m['resid.load, first load'] / hf:.2f}x)")  # fmt: skip
    if has_tokenizer:
        both = m["HF from_pretrained + AutoTokenizer"]
        bare, bare_first = (
            m["resid.load, no tokenizer files"],
            m["resid.load, no tokenizer files, first load"],
        )
        print(f"resid.load / (from_pretrained + AutoTokenizer): {m['resid.load'] / both:.2f}x "
              f"(first load {m['resid.load, first load'] / both:.2f}x)\n"
              f"without tokenizer files, resid.load / from_pretrained: {bare / hf:.2f}x "
              f"(first load {bare_first / hf:.2f}x)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("time", help="load time, resid against transformers (warm, medians)")
    t.add_argument("folder", type=Path)
    t.add_argument("--repeats", type=int, default=9)
    r = sub.add_parser("rss", help="peak host memory of one load, each in a fresh process")
    r.add_argument("folder", type=Path)
    r.add_argument("--dtype", default="bfloat16")
    mk = sub.add_parser("make-llama", help="write a random ~1.1B-parameter Llama checkpoint")
    mk.add_argument("folder", type=Path)
    args = ap.parse_args()
    if args.what == "time":
        timing(args.folder, args.repeats)
    elif args.what == "rss":
        rss(args.folder, args.dtype)
    else:
        make_llama(args.folder)


if __name__ == "__main__":
    main()
