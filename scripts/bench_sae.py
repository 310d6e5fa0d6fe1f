"""What splicing an SAE costs: a forward with one SAE spliced in (error term kept, and
dropped) against the plain forward and against the SAE's two matmuls alone.

The SAE has ``d_sae = 32 × d_model`` (GPT-2 small's public residual SAEs are 24576 wide)
at ``blocks.{n_layers // 2}.hook_resid_pre``. Times are the minimum over ``--runs`` of
each, under ``no_grad``, on one thread by default (steadier on a shared machine).

    python scripts/bench_sae.py                      # 4 layers, 768 wide, batch 4 × 128
    python scripts/bench_sae.py --layers 12          # GPT-2 small's depth

Reports ``overhead = (spliced - plain) / (x @ W_enc + acts @ W_dec)`` for a splice whose
encoder and decoder both run (the SAE's sites cached, or the error term dropped): at most
about 1 means the splice costs no more than its two matmuls. With the error term kept and
nothing observing the SAE, the splice returns its input and costs nothing.

``--patch N`` also times ``resid.sae.patch_features`` on ``N`` features (the patching
engine: each copy joins at the SAE's layer, on the positions the feature changes) against
one plain forward per feature, and prints the largest difference between the two.
"""

from __future__ import annotations

import argparse
import time

import torch

import resid
from resid import metrics
from resid.sae import SAE, SAEConfig, circuits, patch_features


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
    p.add_argument(
        "--patch", type=int, default=0, metavar="N", help="time patch_features on N features"
    )
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

        def spliced(use_error_term: bool, observe: bool = False):
            with model.saes([sae], use_error_term=use_error_term):
                if observe:  # a cache of every SAE site: encoder and decoder both run
                    model.run_with_cache(tokens, names_filter=lambda n: ".sae." in n)
                else:
                    model(tokens)

        kept = best(lambda: spliced(True), args.runs)
        observed = best(lambda: spliced(True, observe=True), args.runs)
        dropped = best(lambda: spliced(False), args.runs)
        W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
        acts = torch.relu(x @ W_enc + sae.b_enc.detach())
        matmuls = best(lambda: (x @ W_enc, acts @ W_dec), args.runs)
        encode_decode = best(lambda: sae(x), args.runs)

    print(
        f"model {args.layers}×{d}, SAE d_sae={32 * d} at {site}, tokens {args.batch}×{args.pos}, "
        f"{args.threads} thread(s), min of {args.runs}"
    )
    rows = [
        ("plain forward", plain),
        ("spliced, error term, nothing observed", kept),
        ("spliced, error term, SAE sites cached", observed),
        ("spliced, no error term", dropped),
        ("the two matmuls alone", matmuls),
        ("sae(x) alone", encode_decode),
    ]
    for what, t in rows:
        print(f"  {what:<38} {t * 1e3:8.1f} ms   (x{t / plain:.2f} the plain forward)")
    for what, t in (("SAE sites cached", observed), ("no error term", dropped)):
        print(f"  overhead, {what}: (spliced - plain) / matmuls = {(t - plain) / matmuls:.2f}")
    if args.patch:
        bench_patch(model, sae, tokens, args.patch)


def bench_patch(model: resid.Model, sae: SAE, tokens: torch.Tensor, n: int) -> None:
    """patch_features on the engine against one forward per feature (the reference)."""
    clean, corrupted = tokens, tokens.clone()
    corrupted[:, tokens.shape[1] // 3] = (
        corrupted[:, tokens.shape[1] // 3] + 1
    ) % model.cfg.d_vocab
    metric = metrics.logit_diff(answer=torch.tensor(11), wrong=torch.tensor(12))
    with torch.no_grad():  # biases that let about 5% of the features fire on these inputs
        _, cache = model.run_with_cache(clean, names_filter=[sae.hook_name])
        pre = (cache[sae.hook_name] - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-pre.flatten(0, 1).quantile(0.95, dim=0))
    with torch.no_grad(), model.saes([sae]):
        _, cache = model.run_with_cache(clean, names_filter=[sae.name_of("hook_acts")])
        acts = cache[sae.name_of("hook_acts")]
        feats = (acts != 0).any(0).any(0).nonzero()[:n, 0]
        t0 = time.perf_counter()
        engine = patch_features(model, corrupted, cache, metric, [sae], feats)
        t_engine = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref, _ = circuits._patch_one_by_one(
            model, corrupted, None, metric, [sae], [acts], torch.zeros_like(feats), feats
        )
        t_ref = time.perf_counter() - t0
    diff = float((engine.values - ref).abs().max())
    print(
        f"  patch_features, {len(feats)} features: engine {t_engine:.2f} s, one forward each "
        f"{t_ref:.2f} s (x{t_ref / t_engine:.1f}); max |engine - one forward each| = {diff:.1e}"
    )


if __name__ == "__main__":
    main()
