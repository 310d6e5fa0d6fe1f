"""A training run's checkpoint folder (``resid.sae.training``): written whole, read checked.

The folder, swapped in whole by :func:`resid.core.files.replace_folder` (writer
:data:`WRITER`), holds

- ``sae/``: the dictionary in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``),
  for ``resid.sae.load`` (an SAE) or ``resid.sae.load_transcoders`` (a transcoder);
- ``state.safetensors``: ``param/NAME`` (every parameter of the objective), ``adam/NAME/
  exp_avg``, ``.../exp_avg_sq``, ``.../step`` (Adam's state) and ``last_fired`` (the step
  each feature last fired at). No random state: every draw of the data comes from a
  generator seeded by (seed, stream, epoch, buffer), so the step says where it resumes;
- ``training.json``: the step, the training configuration, the data's identity and the
  dictionary's sites.

Reading checks before it allocates: regular files inside the folder, of bounded size (from
the shapes the configuration implies), every tensor's name, shape and dtype, finite values,
and a configuration and data that match the run being resumed (each difference named).

>>> write(out, objective, opt, last_fired, record)     # rank 0
>>> state = read(out, objective, record, TrainingError)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from resid.core import files
from resid.sae.config import SAEError, parse_json
from resid.sae.module import SAE
from resid.sae.transcoder_files import saelens_cfg

WRITER = "resid.sae.training"
STATE, RECORD, PRODUCT = "state.safetensors", "training.json", "sae"
# settings a resumed run may change: how long (the learning rate's decay then follows the
# new --steps from the resumed step on), how often it saves and reports
MAY_CHANGE = ("steps", "checkpoint_every", "log_every")


def check_new(out: Path, error: type[Exception]) -> None:
    """Refuse to start a fresh run over an existing checkpoint (or a folder resid cannot
    replace), before any work."""
    path = files.target(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise error(
            f"{out} already exists: pass --resume to continue its run, or choose another --out"
        )
    files.check_target(out, WRITER, "--out")


def _product(dictionary: nn.Module) -> tuple[dict[str, Tensor], str]:
    """The dictionary's SAELens weights and cfg.json text."""
    if isinstance(dictionary, SAE):
        tensors = {k: getattr(dictionary, k).detach() for k in dictionary.cfg.shapes()}
        return tensors, json.dumps(dictionary.cfg.to_dict(), indent=2) + "\n"
    tensors = {k: getattr(dictionary, k).detach() for k in dictionary.cfg.shapes()}
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T  # SAELens stores it [d_out, d_in]
    return tensors, saelens_cfg(dictionary)


def write(
    out: Path, objective: nn.Module, opt: torch.optim.Optimizer, last_fired: Tensor, record: dict
) -> Path:
    """Write the checkpoint folder ``out`` whole (the previous one stays until the new one
    is complete); ``record`` goes to ``training.json``."""
    state = {f"param/{n}": p.detach() for n, p in objective.named_parameters()}
    names = {id(p): n for n, p in objective.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                state[f"adam/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach()
    state["last_fired"] = last_fired
    state = {k: v.cpu().contiguous() for k, v in state.items()}
    weights, cfg = _product(objective.dictionary)
    weights = {k: v.cpu().contiguous() for k, v in weights.items()}
    with files.replace_folder(out, WRITER, "--out", durable=True) as tmp:
        safetensors.torch.save_file(state, str(tmp / STATE))
        (tmp / PRODUCT).mkdir()
        safetensors.torch.save_file(weights, str(tmp / PRODUCT / "sae_weights.safetensors"))
        (tmp / PRODUCT / "cfg.json").write_text(cfg, encoding="utf-8")
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return files.target(out)


def _expected(objective: nn.Module, d_sae: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    want = {}
    for n, p in objective.named_parameters():
        want[f"param/{n}"] = (tuple(p.shape), p.dtype)
        if p.requires_grad:
            want[f"adam/{n}/exp_avg"] = (tuple(p.shape), p.dtype)
            want[f"adam/{n}/exp_avg_sq"] = (tuple(p.shape), p.dtype)
            want[f"adam/{n}/step"] = ((), torch.float32)
    want["last_fired"] = ((d_sae,), torch.int64)
    return want


def read(out: Path, objective: nn.Module, meta: dict, error: type[Exception]) -> dict:
    """The checkpoint in ``out`` as ``{"step", "elapsed", "tensors"}``, after checking that
    resid wrote it, that it belongs to this run (``meta``: the configuration, the data's
    identity, the sites; only :data:`MAY_CHANGE` may differ) and that every tensor has the
    name, shape and dtype this run's objective implies."""
    out = Path(out)
    manifest = files.read_manifest(out)
    if manifest is None or manifest.get("writer") != WRITER:
        raise error(f"{out} holds no training checkpoint (no {files.MANIFEST} from {WRITER}): "
                    "start without --resume")  # fmt: skip
    try:
        record = parse_json(
            files.read_regular(files.inside(out, RECORD), 1 << 20), str(out / RECORD)
        )
    except (OSError, ValueError) as e:
        raise error(f"cannot read {out / RECORD}: {e}; start again without --resume") from None
    if not isinstance(record, dict):
        raise error(f"{out / RECORD} is not a JSON object: start again without --resume")
    changed = []
    for key, value in meta.items():  # what this run is (not how it ran: run, world_size)
        if key == "config":
            old = record.get("config") if isinstance(record.get("config"), dict) else {}
            changed += [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in value.items()
                        if k not in MAY_CHANGE and old.get(k) != v]  # fmt: skip
        elif record.get(key) != value:
            changed.append(f"{key}: {record.get(key)!r} -> {value!r}")
    if changed:
        raise error(
            f"{out} was trained with other settings or data ({'; '.join(changed)}): resume with "
            "the same ones, or train to another --out"
        )
    step, elapsed = record.get("step"), record.get("elapsed", 0.0)
    steps = meta["config"]["steps"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= steps:
        raise error(f"{out / RECORD}: step {step!r} is not in [0, {steps}] (--steps)")
    if not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed):
        elapsed = 0.0
    want = _expected(objective, meta["config"]["d_sae"])
    limit = sum(math.prod(s) * 8 for s, _ in want.values()) + (1 << 20)
    try:
        data = files.read_regular(files.inside(out, STATE), limit)
        tensors = safetensors.torch.load(data)
    except (OSError, ValueError, SAEError) as e:
        raise error(f"cannot read {out / STATE}: {e}; start again without --resume") from None
    except Exception as e:  # safetensors' own error types
        raise error(f"{out / STATE} is not a safetensors file: {e}") from None
    if set(tensors) != set(want):
        raise error(f"{out / STATE} holds {sorted(set(tensors) ^ set(want))} unexpectedly "
                    "(missing or extra): it is not this run's checkpoint")  # fmt: skip
    for name, (shape, dtype) in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise error(f"{out / STATE}: {name} is {tuple(t.shape)} {t.dtype}, not {shape} {dtype}")
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise error(f"{out / STATE}: {name} holds NaN or infinite values")
    return {"step": step, "elapsed": float(elapsed), "tensors": tensors}


def restore(
    objective: nn.Module,
    opt: torch.optim.Optimizer,
    last_fired: Tensor,
    state: dict,
    device: torch.device,
) -> None:
    """Put a checked checkpoint's tensors (from :func:`read`) into the objective, the
    optimizer and the dead-feature counters."""
    t = state["tensors"]
    with torch.no_grad():
        for n, p in objective.named_parameters():
            p.copy_(t[f"param/{n}"])
    for n, p in objective.named_parameters():
        if p.requires_grad:
            opt.state[p] = {
                "step": t[f"adam/{n}/step"].clone(),
                "exp_avg": t[f"adam/{n}/exp_avg"].to(device).clone(),
                "exp_avg_sq": t[f"adam/{n}/exp_avg_sq"].to(device).clone(),
            }
    last_fired.copy_(t["last_fired"])


__all__ = ["WRITER", "check_new", "read", "restore", "write"]
