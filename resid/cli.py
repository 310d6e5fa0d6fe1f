"""The ``resid`` command line.

resid compare MODEL_OR_PATH [--prompt TEXT ...] [--device cuda] [--dtype bfloat16]
resid info MODEL_OR_PATH
resid attention MODEL_OR_PATH "prompt" [--out DIR] [--layers 0,3-5] [--heads 0-3] [--format html,png]
resid attention MODEL_OR_PATH --prompts-file prompts.txt [--out DIR]
resid harvest MODEL_OR_PATH CORPUS --out DIR --sites blocks.5.mlp.hook_post [--activations] [--resume]
resid dashboard HARVEST_DIR --out DIR [--sites ...] [--units 0-99]
resid graph MODEL_OR_PATH "prompt" --transcoders DIR --out DIR [--harvest DIR] [--supernodes FILE]
resid train-sae (--harvest DIR | --model M --tokens FILE | --model M --text FILE) --site HOOK --out DIR
    [--site-out HOOK] [--arch topk] [--resume]   (torchrun ... -m resid.cli train-sae ...: DDP)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

# Only the standard library at import: `resid --help` and `resid --version` answer in a
# fraction of a second. Each command imports torch and the layers it runs inside its own
# function (the top layer, imported by nothing, so these imports cannot hide a cycle;
# tests/test_layout.py still checks their direction).
DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _load(name: str, **kwargs):
    from resid.io.loading import load

    return load(name, **kwargs)


def _compare(args) -> int:
    from resid.io.compare import compare, format_report

    report = compare(args.model, args.prompt, device=args.device, dtype=_dtype(args.dtype))
    print(format_report(report))
    return 0 if report.ok else 1


def _info(args) -> int:
    from resid.core import names

    model = _load(args.model, device=args.device, dtype=_dtype(args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    print(model)
    print(f"parameters: {n_params:,} ({n_params * model.dtype.itemsize / 2**20:.1f} MiB)")
    config = model.cfg.to_dict()
    width = max(map(len, config)) + 2  # two spaces after the longest name
    for key, value in config.items():
        print(f"  {key:<{width}}{value}")
    per_block = [names.parse(n).site.path for n in model.hook_names if names.layer_of(n) == 0]
    outer = [n for n in model.hook_names if names.layer_of(n) is None]
    print(f"hook sites: {len(model.hook_names)}")
    print(f"  outside the blocks: {', '.join(outer)}")
    print(f"  in each block (blocks.{{l}}.…): {', '.join(per_block)}")
    return 0


def _attention(args) -> int:
    if args.prompts_file:
        if args.prompt is not None:
            raise ValueError("give a prompt or --prompts-file, not both")
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --prompts-file {args.prompts_file}: {e}") from e
        prompts: str | list[str] = [line for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file} holds no prompts (one per line)")
    elif args.prompt is None:
        raise ValueError(
            'give a prompt, e.g. resid attention gpt2 "The cat sat", or --prompts-file'
        )
    elif not args.prompt:
        raise ValueError("the prompt is empty: give at least one token of text")
    else:
        prompts = args.prompt
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    if "html" not in formats:
        formats.insert(0, "html")  # the pages are always written; images come on top
    bad = [f for f in formats if f not in ("html", "png", "svg")]
    if bad:
        raise ValueError(f"unknown --format {bad[0]!r}: choose from html, png, svg")
    from resid.viz.attention_pages import check_out, write_attention

    check_out(args.out)  # fail before loading a model when the output cannot be written
    model = _load(args.model, device=args.device, dtype=_dtype(args.dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, n_plots, messages = write_attention(
            model, prompts, args.out, args.layers, args.heads, formats,
            truncate=args.truncate, progress=not args.quiet, label=args.model,
        )  # fmt: skip
    for w in caught:
        print(f"resid attention: warning: {w.message}", file=sys.stderr)
    for message in messages:
        print(f"resid attention: {message}", file=sys.stderr)
    n_prompts = 1 if isinstance(prompts, str) else len(prompts)
    print(f"resid attention: wrote {n_plots} head plot{'s' * (n_plots != 1)} for {n_prompts} "
          f"prompt{'s' * (n_prompts != 1)} to {out}/ "
          f"(open {out / 'index.html'})")  # fmt: skip
    return 0


def _harvest(args) -> int:
    import torch.distributed as dist

    from resid.harvest import run as harvesting
    from resid.harvest.distributed import init_distributed
    from resid.harvest.store import read_harvest

    created = not (dist.is_available() and dist.is_initialized())
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    try:
        model = _load(args.model, device=device, dtype=_dtype(args.dtype))
        out = harvesting.harvest(
            model, args.corpus, args.out, args.sites, stats=not args.no_stats,
            activations=args.activations, context_length=args.context_length, mode=args.mode,
            batch_size=args.batch_size, shard_batches=args.shard_batches,
            max_tokens=args.max_tokens,
            store_dtype=_dtype(args.store_dtype), k=args.k,
            window=args.window, active_threshold=args.active_threshold, exclude_bos=args.exclude_bos,
            text_field=args.text_field, split=args.split, resume=args.resume,
            progress=not args.quiet, log=args.log, label=args.model,
        )  # fmt: skip
    finally:
        if created and world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        info = read_harvest(out)
        print(f"resid harvest: {info['tokens']:,} tokens at {len(info['sites'])} site(s) "
              f"on {world} process(es) -> {out}/")  # fmt: skip
    return 0


def _dashboard(args) -> int:
    from resid.harvest.store import read_harvest
    from resid.sae import files as sae_files
    from resid.viz import dashboard

    dashboard.check_out(args.out)  # before loading a model
    model = None
    if not args.no_model:
        name = args.model or read_harvest(args.harvest)["model"]
        try:
            model = _load(name, device="cpu")
        except (ValueError, OSError) as e:
            raise ValueError(
                f"cannot load the model {name!r}{'' if args.model else ' the harvest names'} "
                f"({e}): pass --model PATH_OR_NAME, or --no-model for token ids without logit "
                "effects"
            ) from e
    saes = [sae_files.load(path, device="cpu") for path in args.sae or ()]
    out, n = dashboard.write_dashboard(
        args.harvest, args.out, model=model, sites=args.sites, units=args.units,
        progress=not args.quiet, saes=saes,
    )  # fmt: skip
    print(f"resid dashboard: {n} unit page{'s' * (n != 1)} -> {out}/ (open {out / 'index.html'})")
    return 0


def _graph(args) -> int:
    import json

    from resid.core import files
    from resid.graphs import attribute
    from resid.sae import load_transcoders
    from resid.viz import graph_page

    files.check_target(args.out, "resid.graphs.Graph.save", "--out")  # before any work
    if args.harvest is not None:
        from resid.harvest.store import read_harvest

        read_harvest(args.harvest)  # a missing or unfinished harvest: said now, not after
    groups = None
    if args.supernodes is not None:
        groups = json.loads(files.read_regular(args.supernodes, 1 << 20))
    model = _load(args.model, device=args.device, dtype=_dtype(args.dtype))
    tcs = load_transcoders(args.transcoders)
    g = attribute(model, tcs, args.prompt, max_n_logits=args.max_n_logits,
                  desired_logit_prob=args.desired_logit_prob, batch_size=args.batch_size,
                  max_feature_nodes=args.max_feature_nodes)  # fmt: skip

    def page(data: dict) -> str:
        contexts = None
        if args.harvest is not None:
            contexts = graph_page.feature_contexts(args.harvest, data, g.tokenizer)
        return graph_page.render(data, contexts, title=f"attribution graph: {args.prompt[:60]}")

    out = g.save(args.out, slug="graph", node_threshold=args.node_threshold,
                 edge_threshold=args.edge_threshold, supernodes=groups,
                 pages={"index.html": page})  # fmt: skip
    print(f"resid graph: {g.n_features} features, {g.n_logits} logits -> {out}/ "
          f"(open {out / 'index.html'})")  # fmt: skip
    return 0


def _train_sae_options(p: argparse.ArgumentParser) -> None:
    from resid.cli_train import add_arguments

    add_arguments(p)


def _train_sae(args) -> int:
    from resid.cli_train import run

    return run(args, "resid train-sae")


class _Parser(argparse.ArgumentParser):
    """A command's parser. ``options(parser)``, given for a command whose options are
    defined in a module that loads torch (``train-sae``'s, in ``resid.cli_train``), adds
    them when that command is parsed, so that ``resid --help`` still loads no torch."""

    def __init__(self, *args, options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._options = options

    def parse_known_args(self, args=None, namespace=None):
        if self._options is not None:
            options, self._options = self._options, None
            options(self)
        return super().parse_known_args(args, namespace)


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, read only when asked for."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("resid")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed: pip install -e .)"
        print(f"resid {number}")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resid", description="GPT-2 interpretability from the command line"
    )
    parser.add_argument("--version", action=_Version, help="print resid's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "model",
            help="a hub name (gpt2, gpt2-medium, …, distilgpt2), a folder or a checkpoint file",
        )
        p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
        p.add_argument("--dtype", default="float32", choices=DTYPES)
        p.set_defaults(run=fn)
        return p

    p = add(
        "compare",
        _compare,
        "logit parity against transformers and TransformerLens (exit 1 beyond tolerance)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt to run (repeatable; default: three built-in prompts)",
    )
    add("info", _info, "config, parameter count, hook sites, dtype and device of a checkpoint")
    p = add(
        "attention",
        _attention,
        "per-head attention heatmaps (HTML, offline) and an index of all heads",
    )
    p.add_argument("prompt", nargs="?", help="the text to look at (BOS is prepended)")
    p.add_argument("--prompts-file", help="a file of prompts, one per line, each to its own folder")
    p.add_argument(
        "--out", default="resid-attention", help="folder to write (default: %(default)s)"
    )
    p.add_argument("--layers", help="layers to plot, e.g. 0,3-5 (default: all)")
    p.add_argument("--heads", help="heads to plot in each layer, e.g. 0-3 (default: all)")
    p.add_argument(
        "--format", default="html", help="html, png, svg, comma-separated (default: html)"
    )
    p.add_argument("--truncate", action="store_true",
                   help="keep the first n_ctx tokens of a longer prompt (default: refuse it)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("harvest", _harvest,
            "activations and per-unit statistics over a corpus (torchrun-aware, resumable)")  # fmt: skip
    p.add_argument("corpus", help=".txt (one document a line), .jsonl, or a saved datasets folder")
    p.add_argument("--out", required=True, help="folder to write (resumable with --resume)")
    p.add_argument("--sites", required=True,
                   help="hook names, comma-separated, e.g. blocks.5.mlp.hook_post")  # fmt: skip
    p.add_argument("--activations", action="store_true",
                   help="store every token's activations as safetensors shards")  # fmt: skip
    p.add_argument("--no-stats", action="store_true", help="no per-unit statistics")
    p.add_argument("--context-length", type=int,
                   help="tokens a context (default: 128, or the model's context if shorter)")  # fmt: skip
    p.add_argument("--mode", choices=("concat", "rows"), default="concat",
                   help="concat: documents joined by BOS and cut; rows: one document a row")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="contexts a forward (8)")
    p.add_argument("--shard-batches", type=int, default=16,
                   help="batches a shard: the unit of work and of resumption (16)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    p.add_argument("--store-dtype", choices=DTYPES, help="dtype of stored activations")
    p.add_argument("--k", type=int, default=16, help="top activating tokens kept a unit (16)")
    p.add_argument("--window", default="12,4", help="tokens before,after each top token (12,4)")
    p.add_argument("--active-threshold", type=float, default=0.0,
                   help="a unit is active above this (0)")  # fmt: skip
    p.add_argument("--exclude-bos", action="store_true", help="leave <|endoftext|> tokens out")
    p.add_argument("--text-field", default="text", help="the .jsonl/datasets text field")
    p.add_argument("--split", help="the split of a saved DatasetDict (default: train)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted harvest")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds for the torch.distributed rendezvous and each collective")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log", action="store_true", help="a line per committed chunk")

    p = sub.add_parser("dashboard", help="offline HTML pages of a harvest's units",
                       description="offline HTML pages of a harvest's units")  # fmt: skip
    p.add_argument("harvest", help="a folder written by resid harvest")
    p.add_argument("--out", default="resid-dashboard", help="folder to write (%(default)s)")
    p.add_argument("--sites", help="sites to show, comma-separated (default: all)")
    p.add_argument("--units", help="units to page, e.g. 0-99 (default: all)")
    p.add_argument("--model", help="the model for token strings and logit effects "
                                   "(default: the one the harvest names)")  # fmt: skip
    p.add_argument("--no-model", action="store_true",
                   help="do not load a model: token ids, no logit effects")  # fmt: skip
    p.add_argument("--sae", action="append", metavar="FOLDER",
                   help="an SAE (SAELens folder) whose features were harvested: their pages "
                        "get logit effects and nearest features/neurons (repeatable)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_dashboard)

    p = add("graph", _graph,
            "an attribution graph of a prompt through transcoders, as JSON and an offline page")  # fmt: skip
    p.add_argument("prompt", help="the text to trace (BOS is prepended)")
    p.add_argument("--transcoders", required=True,
                   help="a folder of transcoders (circuit-tracer's or SAELens' format)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder to write (graph.json, index.html)")
    p.add_argument("--harvest", help="a resid harvest of the transcoders' hook_acts sites: "
                                     "top contexts on each feature's panel")  # fmt: skip
    p.add_argument("--supernodes", help="a JSON file of [name, node_id, ...] groups to save")
    p.add_argument("--max-n-logits", type=int, default=10, help="logit nodes at most (10)")
    p.add_argument("--desired-logit-prob", type=float, default=0.95,
                   help="probability the logit nodes cover (0.95)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256, help="targets a backward pass (256)")
    p.add_argument("--max-feature-nodes", type=int, help="keep the most influential features")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning (0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning (0.98)")

    about = "an SAE or a transcoder trained on a harvest or on the fly (torchrun-aware, resumable)"
    p = sub.add_parser("train-sae", help=about, options=_train_sae_options,
                       description=f"{about}. Many processes: torchrun --nproc-per-node N "
                                   "-m resid.cli train-sae ...")  # fmt: skip
    p.set_defaults(run=_train_sae)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError) as e:  # CheckpointError is a ValueError
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"resid {args.command}: error: {message or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
