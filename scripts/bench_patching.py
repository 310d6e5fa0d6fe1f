"""Time resid's patching sweeps against TransformerLens' on the same weights and inputs.

    python scripts/bench_patching.py                 # GPT-2-small shapes, CPU (~2 min)
    python scripts/bench_patching.py --quick         # a 4-layer, d_model=256 model
    python scripts/bench_patching.py --device cuda

A random GPT-2 (matrices with std 0.1, random biases and LayerNorm gains) is built with
Hugging Face ``transformers``, loaded into resid and into TransformerLens'
TransformerBridge. Clean and corrupted prompts are 8 × 16 independent random tokens (every
position differs: no cell can be skipped), and the metric is the logit difference of two
answer tokens at the last position. Each sweep is timed once per library, after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

import resid
from resid import metrics, patching
from resid.io.references import random_hf_gpt2, transformer_lens_bridge


def timed(fn, device: str):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time
    is the steadier measure of the work done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t, time.process_time() - c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a 4-layer, d_model=256 model")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--no-heads", action="store_true", help="skip the per-head sweep")
    parser.add_argument("--layers", type=int, default=12, help="layers of the 768-wide model (12)")
    args = parser.parse_args()
    from transformer_lens import patching as tl_patching

    shape = dict(n_layer=args.layers, n_head=12, n_embd=768, n_positions=1024)
    if args.quick:
        shape = dict(n_layer=4, n_head=8, n_embd=256, n_positions=256)
    hf = random_hf_gpt2(1, **shape)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = resid.load(folder, device=args.device)
    bridge = transformer_lens_bridge(hf, args.device)

    g = torch.Generator().manual_seed(0)
    b, n = args.prompts, args.tokens
    clean = torch.randint(0, 50257, (b, n), generator=g).to(args.device)
    corrupted = torch.randint(0, 50257, (b, n), generator=g).to(args.device)
    answer, wrong = torch.randint(0, 50257, (2, b), generator=g)
    metric = metrics.logit_diff(answer, wrong, pos=-1)  # declares: 2 logits at the last position

    def plain(logits):  # the same metric as a plain function: all logits get computed
        return metric(logits)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tl_cache = bridge.run_with_cache(clean)
    _, cache = model.run_with_cache(clean)
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"model {shape}; {b} prompts × {n} tokens; metric: logit difference at the last position")

    sweeps = [("resid_pre", True, tl_patching.get_act_patch_resid_pre)]
    if not args.no_heads:
        sweeps.append(("z", False, tl_patching.get_act_patch_attn_head_out_all_pos))
    for site, by_pos, tl_fn in sweeps:
        kw = dict(by_pos=by_pos, progress=False)
        patching.sweep(
            model,
            corrupted[:2, :4],
            cache_slice(cache, 2, 4),
            metric_slice(answer, wrong),
            site,
            **kw,
        )
        run = partial(patching.sweep, model, corrupted, cache, site=site, **kw)
        ours, t_ours = timed(partial(run, metric=metric), args.device)
        ours_plain, t_plain = timed(partial(run, metric=plain), args.device)
        with warnings.catch_warnings(), torch.no_grad():  # TL's fastest setting
            warnings.simplefilter("ignore")
            ref, t_tl = timed(partial(tl_fn, bridge, corrupted, tl_cache, plain), args.device)
        delta = max(
            (ours.values - ref.cpu()).abs().max(), (ours_plain.values - ref.cpu()).abs().max()
        )
        name = f"{site} {'× pos' if by_pos else '× head, all pos'} {tuple(ours.values.shape)}"
        print(f"\n{name}: max |resid - TransformerLens| = {float(delta):.2e}")
        print(f"  {'':36}{'wall s':>9}{'ratio':>8}{'CPU s':>9}{'ratio':>8}")
        for label, (wall, cpu) in [
            ("TransformerLens get_act_patch_*", t_tl),
            ("resid sweep, declared metric", t_ours),
            ("resid sweep, plain function metric", t_plain),
        ]:
            print(f"  {label:36}{wall:9.2f}{t_tl[0] / wall:7.1f}x{cpu:9.2f}{t_tl[1] / cpu:7.1f}x")


def cache_slice(cache, b: int, n: int) -> dict:
    """A warm-up's clean activations: the first ``b`` prompts' first ``n`` positions."""
    return {k: (v[:b, :, :n, :n] if "pattern" in k else v[:b, :n]) for k, v in cache.items()}


def metric_slice(answer, wrong):
    return metrics.logit_diff(answer[:2], wrong[:2], pos=-1)


if __name__ == "__main__":
    main()
