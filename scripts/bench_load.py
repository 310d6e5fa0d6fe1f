"""Loading benchmarks: ``resid.load`` against ``transformers``' ``from_pretrained`` of the same
folder, in time (warm, interleaved runs, medians) and in peak host memory (each load in a
fresh process: peak resident set over the process's resident set just before the load, and
the absolute peak).

    python scripts/bench_load.py time /work/cache/smollm2-st           # a safetensors folder
    python scripts/bench_load.py make-llama /work/cache/llama1b          # ~1.1B random Llama
    python scripts/bench_load.py rss /work/cache/llama1b --dtype bfloat16

``make-llama`` writes TinyLlama-1.1B's shapes (22 layers, width 2048, 32 heads sharing 4
key/value heads, MLP 5632, vocabulary 32000, untied) with random float32 weights, in
shards of about 1 GB with a ``model.safetensors.index.json``, one tensor at a time. The
bound from issue 22 is peak RSS ≤ 1.15 × the bf16 weights' bytes + 400 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    import safetensors.torch
    import torch

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


def timing(folder: Path, repeats: int) -> None:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import resid

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    bare = Path(tempfile.mkdtemp()) / "weights-only"  # the same files, no tokenizer beside them
    bare.mkdir()
    for f in folder.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).symlink_to(f.resolve())
    runs = {
        "resid.load": lambda: resid.load(folder, device="cpu"),
        "resid.load, no tokenizer file": lambda: resid.load(bare, device="cpu"),
        "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(folder),
        "from_pretrained + AutoTokenizer": lambda: (
            AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm: page cache, imports
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>32}: {v * 1e3:7.0f} ms (median of {repeats})")
    shutil.rmtree(bare.parent)
    print(f"resid / from_pretrained: {med['resid.load'] / med['from_pretrained']:.2f}x; "
          f"without the tokenizer: {med['resid.load, no tokenizer file'] / med['from_pretrained']:.2f}x; "
          f"resid / (from_pretrained + tokenizer): "
          f"{med['resid.load'] / med['from_pretrained + AutoTokenizer']:.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("time", help="load time, resid against transformers (warm, medians)")
    t.add_argument("folder", type=Path)
    t.add_argument("--repeats", type=int, default=7)
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
