"""The ``resid`` command line.

resid compare MODEL_OR_PATH [--prompt TEXT ...] [--device cuda] [--dtype bfloat16]
resid info MODEL_OR_PATH
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _compare(args) -> int:
    from resid.compare import compare, format_report

    report = compare(args.model, args.prompt, device=args.device, dtype=DTYPES[args.dtype])
    print(format_report(report))
    return 0 if report.ok else 1


def _info(args) -> int:
    from resid.loading import load

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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"resid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
