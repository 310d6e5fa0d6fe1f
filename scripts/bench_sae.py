"""What splicing an SAE costs: a forward with one SAE spliced in (error term kept, and
dropped) against the plain forward and against the SAE's two matmuls alone.

The SAE has ``d_sae = 32 × d_model`` (GPT-2 small's public residual SAEs are 24576 wide)
at ``blocks.{n_layers // 2}.hook_resid_pre``. Times are the minimum over ``--runs`` of
each, under ``no_grad``, on one thread by default (steadier on a shared machine).

    python scripts/bench_sae.py                      # 4 layers, 768 wide, batch 4 × 128
    python scripts/bench_sae.py --layers 12          # GPT-2 small's depth

Reports ``overhead = (spliced - plain) / (x @ W_enc + acts @ W_dec)``: at most about 1
means the splice costs no more than its two matmuls.
"""

from __future__ import annotations

import argparse
import time

import torch

import resid
from resid.interventions.sae import SAE, SAEConfig


def best(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pos", type=int, default=128)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.d_model
    cfg = resid.Config(
        n_layers=args.layers, n_heads=d // 64, d_model=d, d_head=64, d_mlp=4 * d, n_ctx=1024
    )
    model = resid.Model(cfg).eval()
    site = f"blocks.{args.layers // 2}.hook_resid_pre"
    sae = SAE(SAEConfig(d_in=d, d_sae=32 * d, hook_name=site, architecture="standard"))
    with torch.no_grad():
        sae.W_enc.normal_(std=d**-0.5)
        sae.W_dec.normal_(std=d**-0.5)
        sae.b_enc.fill_(-0.5)  # sparse, as trained SAEs are
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.pos))
    x = torch.randn(args.batch, args.pos, d)

    with torch.no_grad():
        plain = best(lambda: model(tokens), args.runs)

        def spliced(use_error_term: bool):
            with model.saes([sae], use_error_term=use_error_term):
                model(tokens)

        kept = best(lambda: spliced(True), args.runs)
        dropped = best(lambda: spliced(False), args.runs)
        W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
        acts = torch.relu(x @ W_enc)
        matmuls = best(lambda: (x @ W_enc, acts @ W_dec), args.runs)
        encode_decode = best(lambda: sae(x), args.runs)

    print(
        f"model {args.layers}×{d}, SAE d_sae={32 * d} at {site}, tokens {args.batch}×{args.pos}, "
        f"{args.threads} thread(s), min of {args.runs}"
    )
    print(f"  plain forward          {plain * 1e3:8.1f} ms")
    print(
        f"  spliced, error term    {kept * 1e3:8.1f} ms   (×{kept / plain:.2f} the plain forward)"
    )
    print(f"  spliced, no error term {dropped * 1e3:8.1f} ms   (×{dropped / plain:.2f})")
    print(f"  the two matmuls alone  {matmuls * 1e3:8.1f} ms")
    print(f"  sae(x) alone           {encode_decode * 1e3:8.1f} ms")
    print(f"  overhead = (spliced - plain) / matmuls = {(kept - plain) / matmuls:.2f} (error term), "
          f"{(dropped - plain) / matmuls:.2f} (none)")  # fmt: skip


if __name__ == "__main__":
    main()
