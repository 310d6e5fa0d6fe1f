"""Train sparse autoencoders on one site of a resid model and save them in SAELens' format.

Activations come from the model run on the data it was trained on (for the toy induction
model, ``train_toy.batch_with_repeats``), collected once with ``run_with_cache``. Two
architectures:

- ``standard``: ReLU, loss = ‖x - x̂‖² + λ Σ_i a_i ‖W_dec[i]‖ (Anthropic's April 2024
  update: the L1 penalty weighted by decoder norms, so shrinking W_dec cannot dodge it);
- ``topk``: the ``k`` largest pre-activations, loss = ‖x - x̂‖² (Gao et al. 2024).

Decoder rows start at norm 0.1 with ``W_enc = W_decᵀ``, ``b_dec`` at the activations'
mean. After training, the script reports on held-out data: explained variance
``1 - Σ‖x - x̂‖² / Σ‖x - mean‖²``, mean L0 (active features per token), dead features
(never active on the held-out set), and the model's next-token loss spliced without the
error term against the plain model's.

    python scripts/train_sae.py                                  # toy model, both architectures
    python scripts/train_sae.py --arch topk --k 8 --out runs/sae   # one, elsewhere
    python scripts/train_sae.py --transcoders --skip               # a transcoder per layer

``--transcoders`` trains one (skip) transcoder per layer instead: it reads
``blocks.L.ln2.hook_normalized`` and is trained to output ``blocks.L.hook_mlp_out``
(loss ‖mlp_out - x̂‖² + λ Σ_i a_i ‖W_dec[i]‖, ReLU), saved in circuit-tracer's format
under ``OUT/transcoders`` (``resid.sae.load_transcoders`` reads it), with each layer's
explained variance of the MLP's output and mean L0.

Runs in a couple of minutes on one CPU core for the committed toy model (notebooks/toy-induction).

``--harvest`` trains on a harvest's stored activations (``resid harvest --activations``)
through ``resid.sae.training``, exactly as ``resid train-sae`` does (the options and the
run are ``resid.cli_train``'s; only the defaults of ``--model``, ``--site``, ``--out`` and
``--arch`` are this script's toy ones): a standard, top-k or JumpReLU SAE at ``--site``, or
a transcoder from ``--site`` to ``--site-out`` (``--skip``), under torchrun with
DistributedDataParallel (gloo on CPU, NCCL on GPU). The global batch is ``--batch-size``
rows drawn from ``--streams`` streams of shards, so 2 ranks and 1 rank train the same
weights; rank 0 checkpoints to ``--out``, and ``--resume`` continues after a kill::

    torchrun --nproc_per_node 2 scripts/train_sae.py --harvest h --site blocks.5.hook_resid_pre \
        --arch topk --k 32 --d-sae 8192 --streams 2 --steps 20000 --out runs/sae
    torchrun --nproc_per_node 2 scripts/train_sae.py ... --out runs/sae --resume   # after a kill
    python scripts/train_sae.py --synthetic 65536,256 --steps 50 --out /tmp/s      # random rows

``--tokens FILE`` (``.pt`` or ``.npy``: int token ids ``[n_sequences, pos]``; a ``.pt`` may
instead hold ``{"tokens": ..., "attention_mask": ...}``) or ``--text FILE`` (tokenized with
``--model``'s tokenizer and cut into ``--context-length``-token sequences) trains on
activations computed on the fly (``resid.sae.model_streams.ModelStreams``): every rank runs
``--model`` on its own streams' sequences as it trains, no harvest needed::

    torchrun --nproc_per_node 2 scripts/train_sae.py --model gpt2 --text corpus.txt \
        --site blocks.5.hook_resid_pre --arch topk --k 32 --streams 2 --out runs/sae
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import resid
from resid.cli_train import add_arguments, has_source, run
from resid.sae import SAE, SAEConfig, Transcoder, TranscoderConfig, save_transcoders
from resid.sae.training import ARCHITECTURES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_toy import batch_with_repeats  # noqa: E402 - the toy's training distribution

ROOT = Path(__file__).resolve().parent.parent
TOY_DEFAULTS = {"model": str(ROOT / "notebooks" / "toy-induction"),
                "site": "blocks.1.hook_resid_pre", "out": str(ROOT / "runs" / "sae"), "arch": None}  # fmt: skip


@torch.no_grad()
def activations(
    model: resid.Model, site: str, n_batches: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations at ``site`` ``[n, d_in]``, the token batches they came from)."""
    g = torch.Generator().manual_seed(seed)
    acts, batches = [], []
    for _ in range(n_batches):
        tokens = batch_with_repeats(g)
        _, cache = model.run_with_cache(tokens, names_filter=[site])
        acts.append(cache[site].flatten(0, -2))
        batches.append(tokens)
    return torch.cat(acts), torch.stack(batches)


def init_sae(cfg: SAEConfig, data: torch.Tensor, seed: int) -> SAE:
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        sae.W_dec.copy_(0.1 * W / W.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(data.mean(0))
    return sae


def train(
    model: resid.Model,
    site: str = "blocks.1.hook_resid_pre",
    arch: str = "topk",
    d_sae: int = 512,
    k: int = 8,
    l1: float = 0.3,
    steps: int = 2000,
    batch: int = 1024,
    lr: float = 2e-3,
    data: torch.Tensor | None = None,
    seed: int = 0,
    log_every: int = 0,
) -> SAE:
    """Train one SAE on ``data`` (activations at ``site``; collected here if not given).

    >>> sae = train(toy, "blocks.1.hook_resid_pre", arch="topk", d_sae=256, k=8, steps=500)
    """
    if data is None:
        data, _ = activations(model, site, 32, seed)
    cfg = SAEConfig(
        d_in=data.shape[-1],
        d_sae=d_sae,
        hook_name=site,
        architecture=arch,
        k=k if arch == "topk" else None,
        metadata={"model_name": "toy-induction", "trained_with": "resid scripts/train_sae.py"},
    )
    torch.manual_seed(seed)
    sae = init_sae(cfg, data, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    warm = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm, (steps - s) / (steps / 5)),  # warm-up, decay
    )
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        acts = sae.encode(x)
        recons = sae.decode(acts)
        mse = (recons - x).pow(2).sum(-1).mean()
        loss = mse
        if arch == "standard":
            ramp = min(1.0, (step + 1) / warm)  # the penalty ramps up with the learning rate
            loss = mse + ramp * l1 * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            l0 = (acts > 0).float().sum(-1).mean()
            print(f"  step {step:5d}  mse {mse.item():.4f}  L0 {l0:.1f}", flush=True)
    return sae.requires_grad_(False)


@torch.no_grad()
def evaluate(model: resid.Model, sae: SAE, data: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Fidelity on held-out ``data`` (activations) and ``tokens`` ``[n, batch, pos]``."""
    acts = sae.encode(data)
    recons = sae.decode(acts)
    resid_var = (data - recons).pow(2).sum()
    total_var = (data - data.mean(0)).pow(2).sum()
    loss = torch.stack([model(t, return_type="loss") for t in tokens]).mean()
    with model.saes([sae], use_error_term=False):
        spliced = torch.stack([model(t, return_type="loss") for t in tokens]).mean()
    with model.saes([sae]):
        kept = torch.stack([model(t, return_type="loss") for t in tokens]).mean()
    return {
        "explained_variance": 1 - (resid_var / total_var).item(),
        "mean_l0": (acts > 0).float().sum(-1).mean().item(),
        "dead_features": int((~(acts > 0).any(0)).sum()),
        "loss": loss.item(),
        "loss_spliced": spliced.item(),
        "loss_increase": (spliced / loss - 1).item(),
        "loss_with_error_term": kept.item(),
    }


def train_transcoder(
    model: resid.Model,
    layer: int,
    d_sae: int = 256,
    l1: float = 0.3,
    steps: int = 2000,
    skip: bool = False,
    batch: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
) -> tuple[Transcoder, dict]:
    """A ReLU transcoder for block ``layer``'s MLP (``ln2.hook_normalized`` ->
    ``hook_mlp_out``), and its held-out explained variance and mean L0.

    >>> tc, stats = train_transcoder(toy, 1, d_sae=256, steps=500)
    """
    read, write = f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    x, _ = activations(model, read, 32, seed)
    y, _ = activations(model, write, 32, seed)
    x_test, _ = activations(model, read, 8, seed + 1000)
    y_test, _ = activations(model, write, 8, seed + 1000)
    d = x.shape[-1]
    tc = Transcoder(TranscoderConfig(d_in=d, d_sae=d_sae, d_out=y.shape[-1], hook_name=read,
                                     hook_name_out=write, skip=skip))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W = torch.randn(d_sae, y.shape[-1], generator=g)
        tc.W_dec.copy_(0.1 * W / W.norm(dim=-1, keepdim=True))
        tc.W_enc.copy_(torch.randn(d, d_sae, generator=g) / d**0.5)
        tc.b_dec.copy_(y.mean(0))
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    warm = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm, (steps - s) / (steps / 5))
    )
    for step in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        acts = tc.encode(x[i])
        mse = (tc.decode(acts, x[i]) - y[i]).pow(2).sum(-1).mean()
        ramp = min(1.0, (step + 1) / warm)
        loss = mse + ramp * l1 * (acts * tc.W_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    tc.requires_grad_(False)
    with torch.no_grad():
        acts = tc.encode(x_test)
        err = (tc.decode(acts, x_test) - y_test).pow(2).sum()
        var = (y_test - y_test.mean(0)).pow(2).sum()
    return tc, {"explained_variance": 1 - (err / var).item(),
                "mean_l0": (acts > 0).float().sum(-1).mean().item()}  # fmt: skip


def add_distributed(p: argparse.ArgumentParser) -> None:
    """Every option of training on a harvest, on the fly (--tokens, --text) or on synthetic
    rows, under torchrun: ``resid train-sae``'s (``resid.cli_train.add_arguments``)."""
    add_arguments(p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p, defaults=TOY_DEFAULTS, architectures=(*ARCHITECTURES, "both"),
                  arch_help="the toy model: both by default; --harvest: topk by default")  # fmt: skip
    p.add_argument("--transcoders", action="store_true",
                   help="the toy model: a transcoder per layer (MLP input -> output) instead")  # fmt: skip
    args = p.parse_args()
    if has_source(args):  # resid train-sae's run: a harvest, on the fly or synthetic rows
        sys.exit(run(args, "train_sae.py"))
    args.arch = args.arch or "both"
    if args.arch == "jumprelu":
        sys.exit("train_sae.py: JumpReLU SAEs train on a harvest (--harvest) or --synthetic rows")

    torch.set_num_threads(1)  # the matrices are small: one thread is faster on a busy machine
    model = resid.load(args.model, device="cpu")
    t0 = time.perf_counter()
    if args.transcoders:
        tcs = []
        for layer in range(model.cfg.n_layers):
            tc, stats = train_transcoder(model, layer, args.d_sae, args.l1, args.steps,
                                         args.skip, seed=args.seed)  # fmt: skip
            tcs.append(tc)
            print(f"layer {layer}: explained variance {stats['explained_variance']:.3f}, "
                  f"L0 {stats['mean_l0']:.1f}")  # fmt: skip
        out = save_transcoders(tcs, Path(args.out) / "transcoders")
        print(f"trained in {time.perf_counter() - t0:.0f}s, saved to {out}")
        return
    data, _ = activations(model, args.site, 32, args.seed)  # 32 × 64 sequences × 49 tokens
    held_out, tokens = activations(model, args.site, 16, args.seed + 1000)
    print(f"{len(data)} training activations at {args.site} ({time.perf_counter() - t0:.1f}s)")
    for arch in ("standard", "topk") if args.arch == "both" else (args.arch,):
        t0 = time.perf_counter()
        sae = train(
            model, args.site, arch, args.d_sae, args.k, args.l1, args.steps, data=data,
            seed=args.seed, log_every=args.steps // 5,
        )  # fmt: skip
        stats = evaluate(model, sae, held_out, tokens)
        out = resid.sae.save(sae, Path(args.out) / arch)
        print(f"{arch}: trained in {time.perf_counter() - t0:.0f}s, saved to {out}")
        for key, value in stats.items():
            print(
                f"  {key:>22}: {value:.4g}" if isinstance(value, float) else f"  {key:>22}: {value}"
            )


if __name__ == "__main__":
    main()
