"""``resid train-sae``: an SAE or a transcoder trained from the command line with
:func:`resid.sae.training.train`, on one process or as one rank of torchrun's::

    resid train-sae --harvest h --site blocks.5.hook_resid_pre --arch topk --k 32 --out runs/sae
    torchrun --nproc-per-node 2 -m resid.cli train-sae --model gpt2 --text corpus.txt \\
        --site blocks.5.hook_resid_pre --streams 2 --out runs/sae
    torchrun --nproc-per-node 2 -m resid.cli train-sae ... --out runs/sae --resume   # after a kill

The data is one source: a harvest's stored activations (``--harvest DIR``:
:class:`resid.harvest.streams.HarvestStreams`), ``--model``'s activations computed on the
fly on token ids (``--tokens FILE``, ``.pt`` or ``.npy``) or on text (``--text FILE``,
tokenized by the model's tokenizer) (:class:`resid.sae.model_streams.ModelStreams`), or
seeded random rows (``--synthetic ROWS,WIDTH``, for benchmarks). ``--site-out`` trains a
transcoder from ``--site`` to it. Rank 0 checkpoints to ``--out``; ``--resume`` continues.

The options (:func:`add_arguments`) and the run (:func:`run`) are written here only:
``scripts/train_sae.py`` adds the same options, with its toy model's defaults, and runs
the same :func:`run` when given a data source. Its imports load torch, so ``resid.cli``
imports this module only when ``train-sae`` is asked for (``resid --help`` stays instant).

>>> p = argparse.ArgumentParser(prog="resid train-sae")
>>> add_arguments(p)
>>> run(p.parse_args(["--harvest", "h", "--site", "blocks.5.hook_resid_pre", "--out", "o"]),
...     "resid train-sae")
0
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from resid.core import files
from resid.core.distributed import DistributedError, init_distributed
from resid.core.model import Model
from resid.harvest.errors import HarvestError
from resid.harvest.streams import HarvestStreams
from resid.io.loading import load
from resid.sae.model_streams import ModelStreams
from resid.sae.training import ARCHITECTURES, TensorStreams, TrainConfig, TrainingError, train

MAX_TOKEN_FILE = 16 << 30  # bytes of a --tokens file read
MAX_TEXT_FILE = (
    256 << 20
)  # bytes of a --text file (tokenized whole: more, tokenize once to --tokens)
SOURCES = ("harvest", "tokens", "text", "synthetic")  # the data options, one of them a run
ERRORS = (TrainingError, DistributedError, HarvestError, ValueError, TypeError, OSError)


def add_arguments(
    p: argparse.ArgumentParser,
    *,
    defaults: dict | None = None,
    architectures: tuple[str, ...] = ARCHITECTURES,
    arch_help: str = "the dictionary: standard (ReLU, L1), topk or jumprelu (default: topk)",
) -> None:
    """Add every option of a training run to ``p``: the dictionary (``--site``, ``--arch``,
    ``--d-sae``, …), then the data and the run (:func:`add_data_options`). ``defaults``
    gives ``--model``, ``--site``, ``--out`` or ``--arch`` a default (``--site`` and
    ``--out`` are otherwise required); ``architectures`` are ``--arch``'s choices.

    >>> add_arguments(p, defaults={"site": "blocks.1.hook_resid_pre", "out": "runs/sae"})
    """
    defaults = defaults or {}

    def default_or_required(name: str) -> dict:
        return {"default": defaults[name]} if name in defaults else {"required": True}

    p.add_argument("--model", metavar="NAME_OR_PATH", default=defaults.get("model"),
                   help="--tokens, --text: the model run on them (a hub name, a folder or a "
                        "checkpoint file)")  # fmt: skip
    p.add_argument("--site", metavar="HOOK", **default_or_required("site"),
                   help="the hook the dictionary reads, e.g. blocks.5.hook_resid_pre")  # fmt: skip
    p.add_argument(
        "--site-out",
        metavar="HOOK",
        help="train a transcoder from --site to this site (hook_mlp_out)",
    )
    p.add_argument("--skip", action="store_true", help="transcoders with a linear skip term")
    p.add_argument("--arch", choices=architectures, default=defaults.get("arch", "topk"),
                   help=arch_help)  # fmt: skip
    p.add_argument("--d-sae", type=int, default=512, help="features (512)")
    p.add_argument("--k", type=int, default=8, help="topk: features active a row (8)")
    p.add_argument("--l1", type=float, default=0.3,
                   help="the sparsity coefficient: standard's L1, jumprelu's L0 (0.3)")  # fmt: skip
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (2000)")
    p.add_argument("--out", metavar="DIR", **default_or_required("out"),
                   help="the checkpoint folder, written by rank 0 (sae/ in SAELens' format)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    add_data_options(p)


def add_data_options(p: argparse.ArgumentParser) -> None:
    """Add the options of the data (a harvest, on the fly, synthetic rows) and of the run
    (batch, streams, optimizer, checkpoints, torchrun) to ``p``, as one group.

    >>> add_data_options(argparse.ArgumentParser())
    """
    d = p.add_argument_group("the data and the run, on one process or many (torchrun)")
    d.add_argument(
        "--harvest",
        metavar="DIR",
        help="a harvest folder with activations (resid harvest --activations)",
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


def has_source(args: argparse.Namespace) -> bool:
    """Whether ``args`` name a data source (``scripts/train_sae.py`` trains its toy model
    otherwise)."""
    return any(getattr(args, name) for name in SOURCES)


def check(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded or written, options that cannot make a run: no
    data source or more than one, on the fly without a model.

    >>> check(p.parse_args(["--tokens", "t.pt", "--text", "c.txt", "--site", "s", "--out", "o"]))
    Traceback (most recent call last):
    ValueError: give one data source, not --tokens and --text: ...
    """
    given = [f"--{name}" for name in SOURCES if getattr(args, name)]
    options = ("--harvest DIR, --tokens FILE or --text FILE (with --model), or --synthetic "
               "ROWS,WIDTH")  # fmt: skip
    if not given:
        raise ValueError(f"no data to train on: give {options}")
    if len(given) > 1:
        raise ValueError(f"give one data source, not {' and '.join(given)}: {options}")
    if (args.tokens or args.text) and not args.model:
        raise ValueError(
            f"{given[0]} computes activations on the fly: name the model with --model "
            "(a hub name, a folder or a checkpoint file)"
        )
    if args.synthetic:
        synthetic_shape(args.synthetic)
        if args.site_out:
            raise ValueError(
                "--synthetic gives rows at one site: train a transcoder (--site-out) on a "
                "--harvest or on the fly (--tokens, --text)"
            )


def synthetic_shape(spec: str) -> tuple[int, int]:
    """``--synthetic ROWS,WIDTH`` as two ints, at most 2^30 numbers in all."""
    try:
        rows, width = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--synthetic takes ROWS,WIDTH (e.g. 65536,256), not {spec!r}") from None
    if not (0 < rows <= 1 << 26 and 0 < width <= 1 << 14 and rows * width <= 1 << 30):
        raise ValueError(f"--synthetic {spec}: at most 2^30 numbers, please")
    return rows, width


def run(args: argparse.Namespace, prog: str) -> int:
    """Train as ``args`` say (options of :func:`add_arguments`), as this rank of torchrun's
    process group (or alone); returns the exit status: 0, or 1 after printing
    ``{prog} (rank R): error: ...`` on stderr. After a failed collective (a lost rank) the
    process exits at once, since a broken process group aborts in its destructors.

    >>> run(args, "resid train-sae")
    0
    """
    try:
        check(args)
        return _train(args, prog)
    except ERRORS as e:
        rank = os.environ.get("RANK", "0")
        print(f"{prog} (rank {rank}): error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, TrainingError) and dist.is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1


def _train(args: argparse.Namespace, prog: str) -> int:
    """Train on the data ``args`` name as this rank of torchrun's process group."""
    if args.threads:
        torch.set_num_threads(args.threads)
    created = not (dist.is_available() and dist.is_initialized())
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    try:
        streams = world if args.streams is None else args.streams
        cfg = config(args, streams)
        if args.synthetic:
            rows, width = synthetic_shape(args.synthetic)
            g = torch.Generator().manual_seed(args.seed)
            data = TensorStreams(torch.randn(rows, width, generator=g), streams, args.seed)
        elif args.tokens or args.text:
            data = on_the_fly(args, streams, device)
        else:
            sites = [args.site] + ([args.site_out] if args.site_out else [])
            data = HarvestStreams(args.harvest, sites, streams, seed=args.seed,
                                  buffer_shards=args.buffer_shards)  # fmt: skip

        def log(line: str) -> None:
            print(f"{prog}: {line}", file=sys.stderr, flush=True)

        dictionary = train(
            data, cfg, args.out, args.site, args.site_out, args.skip, resume=args.resume,
            rank=rank, world=world, device=device, progress=not args.quiet,
            log=log if args.log_checkpoints else None,
        )  # fmt: skip
        if rank == 0:
            print(f"trained {dictionary!r} for {cfg.steps} steps on {world} rank(s) -> {args.out}")
    except TrainingError:
        raise  # the process group may be broken: not destroyed (run exits at once)
    except BaseException:
        if created and world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if created and world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def config(args: argparse.Namespace, streams: int) -> TrainConfig:
    """The :class:`TrainConfig` the options give; a bad value's error names its option
    (``--d-sae must be an integer in [1, 16777216], not 0``).

    >>> config(args, streams=2).d_sae
    512
    """
    try:
        return TrainConfig(
            architecture=args.arch or "topk", d_sae=args.d_sae, k=args.k, l1=args.l1, lr=args.lr,
            steps=args.steps, batch_size=args.batch_size, streams=streams, seed=args.seed,
            warmup=args.warmup, bandwidth=args.bandwidth, init_threshold=args.init_threshold,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every,
            dead_after=args.dead_after,
        )  # fmt: skip
    except ValueError as e:
        text = str(e)
        field = text.split(" ", 1)[0]
        if field in TrainConfig.__dataclass_fields__ and field != "architecture":
            text = f"--{field.replace('_', '-')}{text[len(field) :]}"
        raise ValueError(text) from None


def read_tokens(path: str) -> tuple[Tensor, Tensor | None]:
    """Token ids ``[n_sequences, pos]`` (and an attention mask, if the file holds one) from
    a ``.pt`` (a tensor, or ``{"tokens", "attention_mask"}``, loaded with
    ``weights_only=True``) or a ``.npy`` (no pickles) regular file.

    >>> tokens, mask = read_tokens("ids.pt")
    """
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
    if not isinstance(got, Tensor):
        raise ValueError(
            f"--tokens {path} holds a {type(got).__name__}: save a tensor of token ids or "
            '{"tokens": ..., "attention_mask": ...}'
        )
    return got, None


def text_tokens(model: Model, path: str, context: int) -> Tensor:
    """``path``'s text tokenized with ``model``'s tokenizer and cut into sequences of
    ``context`` tokens (BOS first where the tokenizer adds one); the tail is dropped.

    >>> tokens = text_tokens(model, "corpus.txt", 128)               # [n, 128]
    """
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
    """The model at ``--model`` on ``--tokens`` or ``--text``, its activations computed as
    it trains.

    >>> data = on_the_fly(args, streams=2, device=torch.device("cpu"))
    """
    model = load(args.model, device=device)
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


__all__ = ["add_arguments", "add_data_options", "check", "has_source", "run"]
