"""The ``resid`` command line.

resid compare MODEL_OR_PATH [--prompt TEXT ...] [--device cuda] [--dtype bfloat16]
resid info MODEL_OR_PATH
resid attention MODEL_OR_PATH "prompt" [--out DIR] [--layers 0,3-5] [--heads 0-3] [--format html,png]
resid attention MODEL_OR_PATH --prompts-file prompts.txt [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from resid.io.compare import compare, format_report
from resid.io.loading import load
from resid.viz.attention_pages import check_out, write_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _compare(args) -> int:
    report = compare(args.model, args.prompt, device=args.device, dtype=DTYPES[args.dtype])
    print(format_report(report))
    return 0 if report.ok else 1


def _info(args) -> int:
    model = load(args.model, device=args.device, dtype=DTYPES[args.dtype])
    n_params = sum(p.numel() for p in model.parameters())
    print(model)
    print(f"parameters: {n_params:,} ({n_params * model.dtype.itemsize / 2**20:.1f} MiB)")
    for key, value in model.cfg.to_dict().items():
        print(f"  {key:<16}{value}")
    per_block = [n.split(".", 2)[2] for n in model.hook_names if n.startswith("blocks.0.")]
    outer = [n for n in model.hook_names if not n.startswith("blocks.")]
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
    check_out(args.out)  # fail before loading a model when the output cannot be written
    model = load(args.model, device=args.device, dtype=DTYPES[args.dtype])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resid", description="GPT-2 interpretability from the command line"
    )
    sub = parser.add_subparsers(dest="command", required=True)

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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError) as e:  # CheckpointError is a ValueError
        print(f"resid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
