"""From a family's checkpoint tensors to resid's parameters, for every family alike: names
normalised, every key and shape checked against the config before any data is read, then
each parameter converted on its own (read from the mapped file, written once into the
dtype and device asked for, checked finite, its pages released).

>>> entries = normalise(read_safetensors(path), LLAMA, "model.safetensors")
>>> params = check(entries, cfg, LLAMA, "model.safetensors")
>>> state = convert(entries, params, cfg, LLAMA, torch.bfloat16, "cpu", False, "model.safetensors")
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from resid.core.config import Config
from resid.io.checkpoint import Stored
from resid.io.errors import CheckpointError
from resid.io.families.common import NON_WEIGHTS, Family, Param, Piece, copied, transposed

SHOWN = 12  # keys listed per kind of problem


def normalise(entries: dict[str, Stored], family: Family, source) -> dict[str, Stored]:
    """Keys without ``_orig_mod.`` (torch.compile) and the family's base-model prefix;
    non-weight buffers dropped. A key present with and without a prefix is refused."""
    out: dict[str, Stored] = {}
    renamed = dict(family.renamed)
    for key, value in entries.items():
        name = key.removeprefix("_orig_mod.")
        for prefix in family.prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        name = renamed.get(name, name)
        if NON_WEIGHTS.search(name):
            continue
        if name in out:
            raise CheckpointError(f"{source} holds '{name}' twice (with and without a prefix)")
        out[name] = value
    return out


def _listed(label: str, keys: list[str]) -> str:
    return f"{label} ({len(keys)}): {', '.join(keys[:SHOWN])}{' …' if len(keys) > SHOWN else ''}"


def check(entries: dict[str, Stored], cfg: Config, family: Family, source) -> dict[str, Param]:
    """resid's parameters for ``cfg``, after every checkpoint key, shape and dtype has been
    compared with them (no data is read). Raises ``CheckpointError`` listing missing,
    unexpected and mis-shaped keys, or non-floating-point tensors."""
    held = family.held(entries)
    if held and cfg.n_layers > held:  # before any per-layer table is built
        raise CheckpointError(
            f"the config of {source} asks for {cfg.n_layers:,} blocks but the weights hold "
            f"{held}: fix its layer count"
        )
    params = family.params(cfg)
    wanted = {piece.key: piece.shape for p in params.values() for piece in p.pieces}
    tied = family.tied if cfg.tie_embeddings and family.tied not in wanted else None
    if tied in entries:
        wanted[tied] = wanted.get(family.embed, (cfg.d_vocab, cfg.d_model))
    missing = [k for k in wanted if k not in entries]
    unexpected = [k for k in entries if k not in wanted]
    misshaped = [
        f"{k}: expected {list(shape)}, got {list(entries[k].shape)}"
        for k, shape in wanted.items()
        if k in entries and entries[k].shape != shape
    ]
    if missing or unexpected or misshaped:
        parts = [_listed(label, keys) for label, keys in (("missing keys", missing),
                 ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"{source} does not fit a {family.architecture} of this config ({cfg}):\n  "
            + "\n  ".join(parts)
        )
    not_float = [
        f"{k} ({entries[k].dtype})" for k in wanted if not entries[k].dtype.is_floating_point
    ]
    if not_float:
        raise CheckpointError(
            f"{source} holds non-floating-point weights: {', '.join(not_float[:8])}; a "
            f"{family.architecture}'s weights are floats (is this a quantised or corrupted checkpoint?)"
        )
    return params


def _finite(t: Tensor) -> bool:
    """No NaN or Inf: one summation in the tensor's own dtype (no float32 copy of it), and
    the exact test, a few million entries at a time, only when the sum is not finite."""
    if t.numel() == 0:
        return True
    if t.dtype.itemsize > 1 and bool(torch.isfinite(t.sum())):
        return True
    rows = max(1, (1 << 22) // max(1, t[0].numel()))
    return all(bool(torch.isfinite(c if c.dtype.itemsize > 1 else c.float()).all())
               for c in t.split(rows))  # fmt: skip


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)


# Writes that are a layout, not a computation: a mapped tensor in the right dtype can
# become the parameter itself (a view of the private file mapping), with no copy.
ALIASES = {
    copied: lambda src, shape: src.view(shape),
    transposed: lambda src, shape: src.T.view(shape),
}


def _alias(param: Param, entries: dict[str, Stored], dtype, device) -> Tensor | None:
    """The parameter as a view of its mapped file, where it needs no conversion at all."""
    if len(param.pieces) != 1 or torch.device(device).type != "cpu":
        return None
    piece = param.pieces[0]
    stored = entries[piece.key]
    if not stored.mapped or stored.dtype != dtype or piece.write not in ALIASES:
        return None
    return ALIASES[piece.write](stored.view(), param.shape)


CHUNK = 8 << 20  # bytes of a mapped tensor read (and released) at a time


def _write(piece: Piece, out: Tensor, stored: Stored) -> None:
    """``piece.write(out, …)``; a large mapped tensor stored in resid's layout (or its
    transpose) is copied a few megabytes of rows at a time, each chunk's pages released
    before the next is read, so that its source never sits in memory whole."""
    src = stored.view()
    if not (stored.mapped and piece.write in ALIASES and src.dim() and stored.nbytes > CHUNK):
        piece.write(out, src)
        stored.release()
        return
    target = out.view(src.shape) if piece.write is copied else out.view(src.shape[::-1]).T
    row = stored.nbytes // src.shape[0]
    step = max(1, CHUNK // max(1, row))
    for a in range(0, src.shape[0], step):
        target[a : a + step].copy_(src[a : a + step])
        stored.release(a * row, step * row)


def convert(
    entries: dict[str, Stored],
    params: dict[str, Param],
    cfg: Config,
    family: Family,
    dtype: torch.dtype,
    device: torch.device | str,
    allow_nonfinite: bool,
    source,
    check_values: bool = True,
) -> dict[str, Tensor]:
    """Each of resid's parameters written once, straight into ``dtype`` on ``device``,
    from the checked ``entries``; NaN or Inf refused unless ``allow_nonfinite`` (then a
    warning names them), as is a tied unembedding that differs from the embedding
    (``check_values=False``: neither is looked for, for entries ``resid.io.checked`` has
    seen pass). At most one stored tensor is read at a time; on the CPU, a tensor
    already in ``dtype`` and in resid's layout is not copied at all: the parameter is a view
    of the file's private, copy-on-write mapping (as ``transformers`` loads), so the model
    can be edited in place without touching the file."""
    state: dict[str, Tensor] = {}
    nonfinite: list[str] = []
    for name, param in params.items():
        out = _alias(param, entries, dtype, device)
        if out is None:
            out = param.empty(dtype, device)
            if not param.pieces:
                out.zero_()
            for piece in param.pieces:
                _write(piece, out, entries[piece.key])
        if check_values and not _finite(out):
            nonfinite += [
                p.key for p in param.pieces if not _finite(entries[p.key].view().to(dtype))
            ] or [name]
        state[name] = out
    if nonfinite:
        listed = ", ".join(nonfinite[:8]) + (" …" if len(nonfinite) > 8 else "")
        if not allow_nonfinite:
            raise CheckpointError(
                f"{source} holds non-finite weights (NaN or Inf) in {listed} (as {dtype}): the "
                "checkpoint is corrupt or training diverged. Pass allow_nonfinite=True to load it anyway."
            )
        warnings.warn(f"{source} holds non-finite weights (NaN or Inf) in {listed}", stacklevel=4)
    tied = family.tied
    if check_values and cfg.tie_embeddings and tied in entries and "lm_head" not in params:
        a, b = entries[tied].view(), entries[family.embed].view()
        if a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):  # NaN equals NaN
            raise CheckpointError(
                f"in {source}, {tied} differs from {family.embed}: the config ties the "
                "unembedding to the embedding (tie_word_embeddings)"
            )
    return state
