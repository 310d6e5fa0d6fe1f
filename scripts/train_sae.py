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
through ``resid.sae.training``: a standard, top-k or JumpReLU SAE at ``--site``, or a
transcoder from ``--site`` to ``--site-out`` (``--skip``), under torchrun with
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
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import resid
from resid.core import files
from resid.core.distributed import DistributedError, init_distributed
from resid.harvest.errors import HarvestError
from resid.harvest.streams import HarvestStreams
from resid.sae import SAE, SAEConfig, Transcoder, TranscoderConfig, save_transcoders
from resid.sae.model_streams import ModelStreams
from resid.sae.training import TensorStreams, TrainConfig, TrainingError
from resid.sae.training import train as train_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_toy import batch_with_repeats  # noqa: E402 - the toy's training distribution

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKEN_FILE = 16 << 30  # bytes of a --tokens file read
MAX_TEXT_FILE = (
    256 << 20
)  # bytes of a --text file (tokenized whole: more, tokenize once to --tokens)


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
    """The options of training on a harvest, on the fly (--tokens, --text) or on synthetic
    rows, under torchrun."""
    d = p.add_argument_group("training on a harvest, on one process or many (torchrun)")
    d.add_argument(
        "--harvest", help="a harvest folder with activations (resid harvest --activations)"
    )
    d.add_argument(
        "--synthetic", metavar="ROWS,WIDTH", help="seeded random rows instead (benchmarks)"
    )
    d.add_argument("--tokens", metavar="FILE",
                   help="on the fly: token ids [n_sequences, pos] (.pt or .npy) run through "
                        "--model as it trains")  # fmt: skip
    d.add_argument(
        "--text", metavar="FILE", help="on the fly: a text file, tokenized with --model's tokenizer"
    )
    d.add_argument("--context-length", type=int, default=128,
                   help="--text: tokens per sequence (BOS first where the tokenizer adds one)")  # fmt: skip
    d.add_argument(
        "--batch-sequences", type=int, default=8, help="on the fly: sequences per forward"
    )
    d.add_argument("--buffer-sequences", type=int, default=64,
                   help="on the fly: sequences whose rows are shuffled together")  # fmt: skip
    d.add_argument("--mean-sequences", type=int, default=256,
                   help="on the fly: sequences the decoder bias's starting mean is taken over")  # fmt: skip
    d.add_argument("--site-out", help="train a transcoder from --site to this site (hook_mlp_out)")
    d.add_argument("--batch-size", type=int, default=1024, help="rows per step over all ranks")
    d.add_argument("--streams", type=int, default=None,
                   help="data streams (default: the number of ranks); the same streams give the "
                        "same weights on any number of ranks that divides them")  # fmt: skip
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--warmup", type=int, default=100)
    d.add_argument("--bandwidth", type=float, default=1e-3, help="JumpReLU's STE kernel width")
    d.add_argument("--init-threshold", type=float, default=1e-3, help="JumpReLU's first threshold")
    d.add_argument("--checkpoint-every", type=int, default=500)
    d.add_argument("--log-every", type=int, default=10)
    d.add_argument("--dead-after", type=int, default=1000, help="steps without firing: dead")
    d.add_argument("--buffer-shards", type=int, default=4, help="shards shuffled together")
    d.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    d.add_argument("--device", default=None, help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    d.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds before a missing rank fails the run (rendezvous, collectives)")  # fmt: skip
    d.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--log-checkpoints", action="store_true",
                   help="a line on stderr per checkpoint (rank 0)")  # fmt: skip


def distributed(args: argparse.Namespace) -> int:
    """Train on a harvest (or synthetic rows) as this rank of torchrun's process group."""
    if args.threads:
        torch.set_num_threads(args.threads)
    created = not (dist.is_available() and dist.is_initialized())
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    try:
        streams = args.streams or world
        cfg = TrainConfig(
            architecture=args.arch or "topk", d_sae=args.d_sae, k=args.k, l1=args.l1, lr=args.lr,
            steps=args.steps, batch_size=args.batch_size, streams=streams, seed=args.seed,
            warmup=args.warmup, bandwidth=args.bandwidth, init_threshold=args.init_threshold,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every,
            dead_after=args.dead_after,
        )  # fmt: skip
        if args.synthetic:
            rows, width = (int(v) for v in args.synthetic.split(","))
            if not (0 < rows <= 1 << 26 and 0 < width <= 1 << 14 and rows * width <= 1 << 30):
                raise ValueError(f"--synthetic {args.synthetic}: at most 2^30 numbers, please")
            g = torch.Generator().manual_seed(args.seed)
            data = TensorStreams(torch.randn(rows, width, generator=g), streams, args.seed)
        elif args.tokens or args.text:
            data = on_the_fly(args, streams, device)
        else:
            sites = [args.site] + ([args.site_out] if args.site_out else [])
            data = HarvestStreams(args.harvest, sites, streams, seed=args.seed,
                                  buffer_shards=args.buffer_shards)  # fmt: skip

        def log(line: str) -> None:
            print(f"train_sae: {line}", file=sys.stderr, flush=True)

        dictionary = train_distributed(
            data, cfg, args.out, args.site, args.site_out, args.skip, resume=args.resume,
            rank=rank, world=world, device=device, progress=not args.quiet,
            log=log if args.log_checkpoints else None,
        )  # fmt: skip
        if rank == 0:
            print(f"trained {dictionary!r} for {cfg.steps} steps on {world} rank(s) -> {args.out}")
    except TrainingError:
        raise  # the process group may be broken: not destroyed (main exits at once)
    except BaseException:
        if created and world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if created and world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def read_tokens(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids ``[n_sequences, pos]`` (and an attention mask, if the file holds one) from
    a ``.pt`` (a tensor, or ``{"tokens", "attention_mask"}``, loaded with
    ``weights_only=True``) or a ``.npy`` (no pickles) regular file."""
    data = files.read_regular(path, MAX_TOKEN_FILE)
    if path.endswith(".npy"):
        try:
            return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)), None
        except (ValueError, OSError, EOFError, TypeError) as e:
            raise ValueError(f"--tokens {path} is not a .npy array of token ids: {e}") from None
    if not path.endswith(".pt"):
        raise ValueError(f"--tokens {path}: a .pt or .npy file of token ids, please")
    try:
        got = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt or foreign file: many types
        raise ValueError(f"--tokens {path} is not a torch file of token ids: {e}") from None
    if isinstance(got, dict) and set(got) <= {"tokens", "attention_mask"} and "tokens" in got:
        return got["tokens"], got.get("attention_mask")
    if not isinstance(got, torch.Tensor):
        raise ValueError(
            f"--tokens {path} holds a {type(got).__name__}: save a tensor of token ids or "
            '{"tokens": ..., "attention_mask": ...}'
        )
    return got, None


def text_tokens(model: resid.Model, path: str, context: int) -> torch.Tensor:
    """``path``'s text tokenized with ``model``'s tokenizer and cut into sequences of
    ``context`` tokens (BOS first where the tokenizer adds one); the tail is dropped."""
    if not 2 <= context <= model.cfg.n_ctx:
        raise ValueError(f"--context-length must be in [2, {model.cfg.n_ctx}], not {context}")
    text = files.read_regular(path, MAX_TEXT_FILE).decode("utf-8", errors="replace")
    tok = model.tokenizer
    bos = [tok.bos_token_id] if tok.add_bos_token else []
    ids = torch.tensor(tok.encode(text), dtype=torch.int64)
    per = context - len(bos)
    n = len(ids) // per
    if n == 0:
        raise ValueError(f"--text {path} has {len(ids)} tokens, less than one sequence of {per}")
    rows = ids[: n * per].view(n, per)
    return torch.cat([torch.tensor(bos, dtype=torch.int64).expand(n, len(bos)), rows], 1)


def on_the_fly(args: argparse.Namespace, streams: int, device: torch.device) -> ModelStreams:
    """The model at --model on --tokens or --text, its activations computed as it trains."""
    if args.tokens and args.text:
        raise ValueError("--tokens or --text, not both")
    model = resid.load(args.model, device=device)
    if args.tokens:
        tokens, mask = read_tokens(args.tokens)
    else:
        tokens, mask = text_tokens(model, args.text, args.context_length), None
    sites = [args.site] + ([args.site_out] if args.site_out else [])
    return ModelStreams(
        model, tokens, sites, streams, args.seed, attention_mask=mask,
        batch_sequences=args.batch_sequences, buffer_sequences=args.buffer_sequences,
        mean_sequences=args.mean_sequences, device=device,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "notebooks" / "toy-induction"))
    p.add_argument("--site", default="blocks.1.hook_resid_pre")
    p.add_argument("--arch", choices=["standard", "topk", "jumprelu", "both"], default=None,
                   help="the toy model: both by default; --harvest: topk by default")  # fmt: skip
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--l1", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "runs" / "sae"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transcoders", action="store_true",
                   help="train a transcoder per layer (MLP input -> output) instead")  # fmt: skip
    p.add_argument("--skip", action="store_true", help="transcoders with a linear skip term")
    add_distributed(p)
    args = p.parse_args()
    if args.harvest or args.synthetic or args.tokens or args.text:
        try:
            sys.exit(distributed(args))
        except (TrainingError, DistributedError, HarvestError, ValueError, TypeError, OSError) as e:
            rank = os.environ.get("RANK", "0")
            print(f"train_sae.py (rank {rank}): error: {e}", file=sys.stderr, flush=True)
            if isinstance(e, TrainingError) and dist.is_initialized():
                # a broken process group aborts in its destructors at exit: leave at once
                sys.stdout.flush()
                os._exit(1)
            sys.exit(1)
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
