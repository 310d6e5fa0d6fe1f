"""One benchmark for everything: resid against Hugging Face ``transformers`` (sdpa and
eager) and TransformerLens' TransformerBridge, on the same weights and inputs, in one
process.

    python scripts/bench.py                          # GPT-2-small shapes on CPU (~20 min on 2 cores)
    python scripts/bench.py --quick                  # a smoke run (41 s of CPU; 85 s on 2 busy cores)
    python scripts/bench.py --model SmolLM2.gguf     # a real model (SmolLM2-135M: 43 min on 2 busy cores)
    python scripts/bench.py --device cuda            # adds bf16 and 16 x 1024 where CUDA is present
    python scripts/bench.py --out bench.json --markdown

``--model PATH`` runs every measure on a real model (a GGUF file, e.g. the one
``scripts/fetch_smollm2.py`` prints): resid loads it, transformers loads the same file
with its own GGUF reader, and the bridge is booted over transformers' model where it can
be; loading is timed as each library's GGUF load, and as a safetensors folder of the same
(dequantised) weights and tokenizer against ``from_pretrained``. Results go to a JSON file, by default
in the system's temporary folder (the path is printed); ``--out`` puts it elsewhere.

Every measure warms each library up once, then runs them interleaved (A B C, A B C, ...)
``--runs`` times (>= 5) and reports the median wall time, the median CPU time of this
process (steadier on a shared machine), the ratio of each peer's median to resid's
(> 1: resid is faster) and the peak memory of one more run (CUDA: ``max_memory_allocated``;
CPU: the peak resident set above the level before the call, sampled every millisecond,
so approximate). Without ``--model`` the model is a random GPT-2 built with
``transformers`` (``resid.io.references.random_hf_gpt2``), saved, and loaded into resid;
the bridge wraps a copy of the same weights. ``--quick`` is a smoke run: a 4-layer model,
3 runs, no memory sampling and no TransformerLens sweeps.

Measures: plain forward (1 x 1024 and 4 x 256); ``run_with_cache`` of the residual
sites and of every site; the 12 x 16 ``resid_pre`` sweep and the per-head ``z`` sweep on
8 x 16 tokens against ``transformer_lens.patching``; greedy generation of 32/128/256 tokens
from 16 against ``transformers``' ``generate`` (no early stop at EOS on either side);
loading a saved folder, or the GGUF file.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import warnings
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil
import torch
import transformers
from bench_load import folder_loads, save_folder
from bench_timing import compare, show
from torch import Tensor
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import resid
from resid import metrics, patching
from resid.io.references import random_hf_gpt2, transformer_lens_bridge

SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
QUICK = dict(n_layer=4, n_head=8, n_embd=256, n_positions=512)


# ---- the peers ---------------------------------------------------------------------------


def build(shape: dict, device: str, dtype: torch.dtype, folder: str):
    """(resid model, HF sdpa, HF eager, TL bridge) with the same weights."""
    hf = random_hf_gpt2(1, **shape)
    hf.save_pretrained(folder)
    model = resid.load(folder, device=device, dtype=dtype)
    sdpa = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    eager = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
    bridge = transformer_lens_bridge(hf.to(dtype), device)
    return model, sdpa.to(device).eval(), eager.to(device).eval(), bridge


def hf_gguf(path: str, device: str, dtype: torch.dtype = torch.float32):
    """transformers' own load of a GGUF file."""
    folder, name = os.path.split(os.path.abspath(path))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device)


def build_real(path: str, device: str, dtype: torch.dtype = torch.float32, tl: bool = True):
    """(resid model, HF sdpa, HF eager, TL bridge or None) of a real model file, each
    library loading it itself (the bridge wraps a copy of transformers' model; booted
    only with ``tl``)."""
    model = resid.load(path, device=device, dtype=dtype)
    sdpa = hf_gguf(path, device, dtype) if path.endswith(".gguf") else (
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device))  # fmt: skip
    sdpa.set_attn_implementation("sdpa")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    bridge = None
    if not tl:
        pass
    elif model.cfg.architecture == "gpt2":
        bridge = transformer_lens_bridge(sdpa, device)
    else:  # the bridge reads the architecture from a config folder: transformers' own
        config = tempfile.mkdtemp(prefix="resid-bench-config-")
        sdpa.config.save_pretrained(config)
        try:
            bridge = transformer_lens_bridge(sdpa, device, config_from=config)
        except Exception as e:  # the bridge may not know the family: its measures are skipped
            print(f"TransformerLens' bridge cannot boot this model ({type(e).__name__}: {e})")
    return model, sdpa.eval(), eager.eval(), bridge


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small model and inputs")
    parser.add_argument("--model", help="a real model to run every measure on (a .gguf file)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per measure (>= 5; --quick: 3)")  # fmt: skip
    parser.add_argument("--out", help="the JSON file (default: in the temporary folder)")
    parser.add_argument(
        "--only", default="", help="comma-separated: forward,cache,sweep,generate,load"
    )
    parser.add_argument(
        "--plain-metric", action="store_true", help="also time sweeps with a plain metric"
    )
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table")
    args = parser.parse_args()
    args.runs = args.runs or (3 if args.quick else 5)
    if args.runs < 5 and not args.quick:
        parser.error("--runs must be at least 5 (medians of >= 5 runs)")
    if args.quick and args.model:
        parser.error("--quick runs a small random model: leave out --model")
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join(tempfile.gettempdir(), "resid-bench", f"bench-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    only = set(filter(None, args.only.split(","))) or {
        "forward",
        "cache",
        "sweep",
        "generate",
        "load",
    }
    device, cuda = args.device, args.device.startswith("cuda")
    shape = QUICK if args.quick else SMALL
    memory = not args.quick
    from transformer_lens import patching as tl_patching

    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "load_average": os.getloadavg()[0],
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
            "resid": resid.__version__,
        },
        "device": device,
        "model": args.model or "random GPT-2",
        "shape": shape,
        "runs": args.runs,
        "results": {},
    }
    print(json.dumps({k: report[k] for k in ("date", "machine", "versions", "device")}, indent=1))
    results = report["results"]
    runs = args.runs

    def save() -> None:  # after every measure, so that a cut-short run keeps what it did
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    g = torch.Generator().manual_seed(0)
    folder = tempfile.mkdtemp(prefix="resid-bench-")
    warnings.simplefilter("ignore")
    if args.model:
        # a real model's bridge is booted for the measures that need TransformerLens
        model, sdpa, eager, bridge = build_real(
            args.model, device, tl=bool({"cache", "sweep"} & only)
        )
        c = model.cfg
        report["shape"] = shape = dict(n_layer=c.n_layers, n_head=c.n_heads, n_kv_head=c.kv_heads,
                                       n_embd=c.d_model, d_mlp=c.d_mlp, vocab=c.d_vocab)  # fmt: skip
        print(f"real model: {args.model}")
    else:
        model, sdpa, eager, bridge = build(shape, device, torch.float32, folder)
    print(f"model {shape}, medians of {args.runs} interleaved runs after a warm-up")
    vocab = model.cfg.d_vocab
    pad = model.tokenizer.pad_token_id if vocab != 50257 else 50256

    def peers(fns: dict) -> dict:  # the bridge's entries only where it booted
        return {k: v for k, v in fns.items() if v is not None}

    # ---- plain forward -------------------------------------------------------------------
    if "forward" in only:
        sizes = [(1, 64), (4, 32)] if args.quick else [(1, 1024), (4, 256)]
        if args.model:  # a 135M model on a shared CPU: inputs that keep the run to minutes
            sizes = [(1, 128), (4, 32)]
        if cuda:
            sizes.append((16, 1024))
        for b, n in sizes:
            t = torch.randint(0, vocab, (b, n), generator=g).to(device)
            r = compare(
                peers(
                    {
                        "resid": partial(model, t),
                        "HF sdpa": lambda t=t: sdpa(t).logits,
                        "HF eager": lambda t=t: eager(t).logits,
                        "TransformerLens bridge": bridge and partial(bridge, t),
                    }
                ),
                runs,
                device,
                memory,
            )
            results[f"forward {b}x{n} fp32"] = r
            save()
            show(f"forward {b} x {n}, fp32", r)
        if cuda and not args.model:  # bf16, and how often its top-1 agrees with fp32's
            folder16 = tempfile.mkdtemp(prefix="resid-bench-bf16-")
            m16, s16, e16, b16 = build(shape, device, torch.bfloat16, folder16)
            t = torch.randint(0, 50257, (16, 1024), generator=g).to(device)
            r = compare(
                {
                    "resid": partial(m16, t),
                    "HF sdpa": lambda: s16(t).logits,
                    "HF eager": lambda: e16(t).logits,
                    "TransformerLens bridge": partial(b16, t),
                },
                runs,
                device,
            )
            with torch.no_grad():
                agree = (m16(t).argmax(-1) == model(t).argmax(-1)).float().mean().item()
            r["resid"]["top1_agreement_with_fp32"] = agree
            results["forward 16x1024 bf16"] = r
            save()
            show(f"forward 16 x 1024, bf16 (top-1 agreement with fp32: {agree:.4f})", r)
            del m16, s16, e16, b16

    # ---- run_with_cache ------------------------------------------------------------------
    if "cache" in only and bridge is not None:
        b, n = (2, 32) if args.quick or args.model else (4, 256)
        t = torch.randint(0, vocab, (b, n), generator=g).to(device)

        def is_resid(name: str) -> bool:
            return name.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))

        tl_resid = [nm for nm in resid_names(model) if is_resid(nm)]
        for label, ours, theirs in [
            ("residual sites", dict(names_filter=is_resid), dict(names_filter=tl_resid)),
            ("every site", {}, {}),
        ]:
            sizes: dict[str, int] = {}

            def run_ours(kw=ours, sizes=sizes):
                _, cache = model.run_with_cache(t, **kw)
                sizes["resid"] = cache_bytes(cache)
                return cache

            def run_tl(kw=theirs, sizes=sizes):
                _, cache = bridge.run_with_cache(t, **kw)
                sizes["TransformerLens bridge"] = cache_bytes(cache)
                return cache

            r = compare({"resid": run_ours, "TransformerLens bridge": run_tl}, runs, device, memory)
            for name in r:
                r[name]["cache_bytes"] = sizes[name]
            results[f"run_with_cache {label} {b}x{n}"] = r
            save()
            show(
                f"run_with_cache, {label}, {b} x {n} (cache MiB: resid "
                f"{sizes['resid'] / 2**20:.0f}, TL {sizes['TransformerLens bridge'] / 2**20:.0f})",
                r,
            )

    # ---- patching sweeps -----------------------------------------------------------------
    if "sweep" in only and bridge is not None:
        b, n = (2, 4) if args.model else (4, 8) if args.quick else (8, 16)
        clean = torch.randint(0, vocab, (b, n), generator=g).to(device)
        corrupted = torch.randint(0, vocab, (b, n), generator=g).to(device)
        answer, wrong = torch.randint(0, vocab, (2, b), generator=g)
        metric = metrics.logit_diff(answer, wrong, pos=-1)  # declares 2 logits at the last pos

        def plain(logits):  # the same metric as a plain function of all logits
            return metric(logits)

        with torch.no_grad():
            _, tl_cache = bridge.run_with_cache(clean)
            _, cache = model.run_with_cache(clean)
        small = metrics.logit_diff(answer[:2], wrong[:2], pos=-1)
        small_cache = {k: v[:2] for k, v in cache.items()}
        sweeps = [
            ("resid_pre", True, tl_patching.get_act_patch_resid_pre),
            ("z", False, tl_patching.get_act_patch_attn_head_out_all_pos),
        ]
        for site, by_pos, tl_fn in sweeps[:1] if args.model else sweeps:  # --model: resid_pre
            run = partial(
                patching.sweep, model, corrupted, cache, site=site, by_pos=by_pos, progress=False
            )
            out: dict[str, Tensor] = {}

            def ours(m=metric, run=run, out=out):
                out["declared"] = run(metric=m).values
                return out["declared"]

            def ours_plain(run=run):
                return run(metric=plain).values

            def tl(tl_fn=tl_fn, out=out):
                out["tl"] = tl_fn(bridge, corrupted, tl_cache, plain)
                return out["tl"]

            fns = {"resid, declared metric": ours, "TransformerLens patching": tl}
            if args.quick:  # a smoke run: TransformerLens' sweep is a forward per cell
                del fns["TransformerLens patching"]
            if args.plain_metric:
                fns["resid, plain metric"] = ours_plain

            def warm(name, site=site, by_pos=by_pos, tl_fn=tl_fn):
                if name.startswith("resid"):
                    patching.sweep(
                        model,
                        corrupted[:2],
                        small_cache,
                        small,
                        site,
                        by_pos=by_pos,
                        progress=False,
                    )
                else:  # one TL forward warms its path; a whole sweep is minutes on a CPU
                    bridge(corrupted[:2])

            r = compare(fns, runs, device, memory=False, warmup=warm)
            delta = float("nan")  # --quick: not compared
            if "tl" in out:
                delta = float((out["declared"].cpu() - out["tl"].cpu()).abs().max())
            r["resid, declared metric"]["max_abs_diff_to_tl"] = delta
            results[f"sweep {site} {tuple(out['declared'].shape)}"] = r
            save()
            show(f"sweep {site} {tuple(out['declared'].shape)}, max |resid - TL| {delta:.1e}", r)

    # ---- generation ----------------------------------------------------------------------
    if "generate" in only:
        prompt = torch.randint(0, vocab, (1, 16), generator=g).to(device)
        lengths = [8, 16] if args.quick else [16, 64] if args.model else [32, 128, 256]
        per_token = {}
        for new in lengths:
            # min_new_tokens keeps HF from stopping at a random EOS
            r = compare(
                {
                    "resid generate (KV cache)": partial(
                        model.generate, prompt, new, temperature=0, stop_at_eos=False
                    ),
                    "HF sdpa generate": lambda new=new: sdpa.generate(
                        prompt,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=pad,
                    ),
                },
                runs,
                device,
                memory=False,
                warmup=lambda name: (
                    model.generate(prompt, 4, temperature=0)
                    if name.startswith("resid")
                    else sdpa.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=pad)
                ),
            )
            for name in r:
                r[name]["tokens_per_s"] = new / r[name]["wall_s"]
                r[name]["s_per_token"] = r[name]["wall_s"] / new
            per_token[new] = r
            results[f"generate {new} tokens from 16"] = r
            save()
            show(f"greedy generation, {new} new tokens from 16", r, per=new)
        lo, hi = lengths[0], lengths[-1]
        growth = {
            name: per_token[hi][name]["s_per_token"] / per_token[lo][name]["s_per_token"]
            for name in per_token[hi]
        }
        results[f"generate per-token time {hi} / {lo}"] = growth
        save()
        print(f"  per-token time at {hi} / at {lo}: {growth}")

    # ---- load ----------------------------------------------------------------------------
    if "load" in only and args.model:
        r = compare(
            {
                "resid.load (GGUF)": partial(resid.load, args.model, device=device),
                "HF from_pretrained (GGUF)": partial(hf_gguf, args.model, device),
            },
            runs,
            device,
            memory=False,
        )
        results["load the model file"] = r
        save()
        show(f"load {os.path.basename(args.model)}, each library's own reader", r)
        save_folder(sdpa, args.model, folder)
    if "load" in only:
        r = folder_loads(folder, device, runs, tokenizer=bool(args.model))
        results["load saved folder"] = r
        save()
        show("load a safetensors folder (config.json + model.safetensors)", r)

    save()
    print(f"\nwrote {args.out}")
    if args.markdown:
        print(markdown(report))


def resid_names(model: resid.Model) -> list[str]:
    return list(model.hook_dict)


def cache_bytes(cache) -> int:
    return sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, Tensor))


def markdown(report: dict) -> str:
    """The results as the rows of BENCHMARKS.md's table."""
    lines = [
        "| measure | implementation | median wall s | median CPU s | time / resid's | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for measure, r in report["results"].items():
        if not all(isinstance(v, dict) for v in r.values()):
            ratios = ", ".join(f"{k}: {v:.2f}" for k, v in r.items())
            lines.append(f"| {measure} | {ratios} | | | | |")
            continue
        for name, v in r.items():
            mem = "" if v.get("peak_bytes") is None else f"{v['peak_bytes'] / 2**20:.0f}"
            extra = f" ({v['tokens_per_s']:.1f} tok/s)" if "tokens_per_s" in v else ""
            lines.append(
                f"| {measure} | {name}{extra} | {v['wall_s']:.3f} | {v['cpu_s']:.3f} | "
                f"{v['ratio_to_resid']:.2f}x | {mem} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
