"""Benchmarks of ``resid harvest`` (random weights, GPT-2 tokenizer, stdlib docstrings as the
corpus; no network). Runs are interleaved and medians taken, since the machine may be shared.

1. statistics at one site (``blocks.11.mlp.hook_post``, 3072 units) on GPT-2-small shapes
   against the plain forward over the same tokens (``model(tokens)``, logits included) and
   against the forward cut at the same layer (what the harvest itself runs);
2. storing that site's activations in bf16, against the same two forwards;
3. tokens/s of 2 processes x 1 thread (``torchrun --nproc-per-node 2``) against 1 x 1;
4. peak RSS of a statistics harvest over N and 10 N tokens (bounded memory).

    python scripts/bench_harvest.py            # everything (several minutes on 2 cores)
    python scripts/bench_harvest.py --quick    # fewer tokens, fewer repeats
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import resid
from resid import harvest as H
from resid.core.config import Config
from resid.harvest.corpus import contexts, open_corpus

SITE = "blocks.11.mlp.hook_post"


def corpus(path: Path, copies: int) -> Path:
    import collections
    import json as json_module
    import textwrap

    docs = []
    for module in (collections, json_module, textwrap, os, os.path, inspect, statistics):
        for obj in vars(module).values():
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                docs.append(" ".join(doc.split()))
    docs = list(dict.fromkeys(docs))
    path.write_text("\n".join(docs * copies) + "\n")
    return path


def small_model(folder: Path, n_layers: int = 12) -> Path:
    torch.manual_seed(0)
    model = resid.Model(Config(n_layers=n_layers))
    return resid.save(model, folder)


def time_forward(model, tokens: torch.Tensor, batch: int, stop: int | None) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            if stop is None:
                model(tokens[i : i + batch])
            else:
                model(tokens[i : i + batch], stop_at_layer=stop)
    return time.perf_counter() - t0


def time_harvest(model, text: Path, out: Path, max_tokens: int, batch: int, **kw) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    H.harvest(model, text, out, [SITE], max_tokens=max_tokens, batch_size=batch,
              context_length=128, progress=False, **kw)  # fmt: skip
    return time.perf_counter() - t0


def bench_overhead(tmp: Path, text: Path, max_tokens: int, repeats: int) -> dict:
    model = resid.load(small_model(tmp / "gpt2-small-shape"), device="cpu")
    batch = 8
    rows = []
    for ids, _ in contexts(open_corpus(text), model.tokenizer, 128):
        rows.append(ids)
        if len(rows) * 128 >= max_tokens:
            break
    tokens = torch.tensor(rows)
    runs: dict[str, list[float]] = {k: [] for k in ("forward", "forward_cut", "stats", "bf16")}
    for _ in range(repeats):  # interleaved
        runs["forward"].append(time_forward(model, tokens, batch, None))
        runs["forward_cut"].append(time_forward(model, tokens, batch, 12))
        runs["stats"].append(time_harvest(model, text, tmp / "s", max_tokens, batch))
        runs["bf16"].append(time_harvest(model, text, tmp / "a", max_tokens, batch, stats=False,
                                         activations=True, store_dtype=torch.bfloat16))  # fmt: skip
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "tokens": int(tokens.numel()),
        "seconds": med,
        "stats/forward": med["stats"] / med["forward"],
        "stats/forward_cut": med["stats"] / med["forward_cut"],
        "bf16/forward": med["bf16"] / med["forward"],
        "bf16/forward_cut": med["bf16"] / med["forward_cut"],
    }


def _cli(model_dir: Path, text: Path, out: Path, max_tokens: int, procs: int) -> list[str]:
    args = ["harvest", str(model_dir), str(text), "--out", str(out), "--sites",
            "blocks.3.mlp.hook_post", "--max-tokens", str(max_tokens), "--quiet",
            "--device", "cpu", "--batch-size", "8", "--shard-batches", "2"]  # fmt: skip
    if procs == 1:
        return [sys.executable, "-m", "resid", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
            "--master-port", "29533", "-m", "resid", *args]  # fmt: skip


def bench_processes(tmp: Path, text: Path, max_tokens: int, repeats: int) -> dict:
    model_dir = small_model(tmp / "gpt2-4layer", n_layers=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for procs in (1, 2):
            out = tmp / f"p{procs}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(_cli(model_dir, text, out, max_tokens, procs), env=env, check=True,
                           stdout=subprocess.DEVNULL, timeout=900)  # fmt: skip
            info = H.read_harvest(out)
            rates[procs].append(info["tokens"] / info["seconds"])
    med = {p: statistics.median(v) for p, v in rates.items()}
    return {"tokens/s 1x1": med[1], "tokens/s 2x1": med[2], "speedup": med[2] / med[1]}


RSS = """
import resource, sys, torch, resid
from resid import harvest as H
from resid.harvest.corpus import contexts, open_corpus
model = resid.load(sys.argv[1], device="cpu")
H.harvest(model, sys.argv[2], sys.argv[3], ["blocks.3.mlp.hook_post"], max_tokens=int(sys.argv[4]),
          batch_size=8, k=16, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_rss(tmp: Path, text: Path, max_tokens: int) -> dict:
    model_dir = tmp / "gpt2-4layer"
    if not model_dir.exists():
        small_model(model_dir, n_layers=4)
    peaks = {}
    for scale in (1, 10):
        out = tmp / f"rss{scale}"
        shutil.rmtree(out, ignore_errors=True)
        run = subprocess.run([sys.executable, "-c", RSS, str(model_dir), str(text), str(out),
                              str(max_tokens * scale)], capture_output=True, text=True,
                             check=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        peaks[scale] = int(run.stdout.split()[-1]) / 1024
    return {"peak RSS MiB 1x": peaks[1], "peak RSS MiB 10x": peaks[10],
            "ratio": peaks[10] / peaks[1], "tokens 1x": max_tokens}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("overhead", "processes", "rss"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    n, reps = (2048, 3) if args.quick else (4096, 5)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-harvest-") as d:
        tmp = Path(d)
        text = corpus(tmp / "docs.txt", copies=40)
        if args.only in (None, "overhead"):
            results["overhead"] = bench_overhead(tmp, text, n, reps)
            print(json.dumps(results["overhead"], indent=1), flush=True)
        if args.only in (None, "processes"):
            results["processes"] = bench_processes(tmp, text, 4 * n, max(reps - 2, 1))
            print(json.dumps(results["processes"], indent=1), flush=True)
        if args.only in (None, "rss"):
            results["rss"] = bench_rss(tmp, text, n)
            print(json.dumps(results["rss"], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
