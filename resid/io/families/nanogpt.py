"""nanoGPT's ``ckpt.pt`` (``train.py``): a GPT-2 whose settings are ``model_args`` and whose
``nn.Linear`` weights are stored ``[out, in]``.

Its tensors are presented in GPT-2's layout (transposed on read, not copied; a
``bias=False`` model's biases as zeros) and built as a GPT-2 (``resid.io.families.gpt2``),
with nanoGPT's exact GELU.

>>> cfg = config({"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256,
...               "vocab_size": 65}, "ckpt.pt", held=6)
"""

from __future__ import annotations

from pathlib import Path

import torch

from resid.core.config import Config
from resid.io.checkpoint import Stored, state_dict
from resid.io.errors import CheckpointError
from resid.io.families.common import head_width, layers, make_config, positive_int

LINEAR_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
OUTSIDE_BLOCKS = ("wte.weight", "wpe.weight", "lm_head.weight")


def is_nanogpt(obj: object) -> bool:
    """Whether a pickled checkpoint is nanoGPT's (``model_args`` and ``model``)."""
    return isinstance(obj, dict) and "model_args" in obj and "model" in obj


def config(args: object, where: str, held: int | None = None) -> Config:
    """resid's Config from nanoGPT's ``model_args``."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{where} is a {type(args).__name__}, not a dict of settings")
    n_embd, n_head = positive_int(args, "n_embd", where), positive_int(args, "n_head", where)
    return make_config(
        where, n_layers=layers(args, "n_layer", where, held), n_heads=n_head, d_model=n_embd,
        d_head=head_width(n_embd, n_head, where), d_mlp=4 * n_embd,
        d_vocab=positive_int(args, "vocab_size", where),
        n_ctx=positive_int(args, "block_size", where), act_fn="gelu",
    )  # fmt: skip


def bias_flag(args: object, where: str) -> bool:
    """nanoGPT's ``bias`` setting (``False``: every bias is zero and none is stored)."""
    bias = args.get("bias", True) if isinstance(args, dict) else True
    if not isinstance(bias, bool):
        raise CheckpointError(f"{where}: 'bias' must be true or false, not {bias!r}")
    return bias


def as_gpt2(model: object, path: Path, bias: bool) -> dict[str, Stored]:
    """The ``model`` state dict in GPT-2's layout (``_orig_mod.``/``transformer.`` prefixes
    are removed by the caller's normalisation): ``nn.Linear`` weights read transposed, and
    zero biases for a ``bias=False`` model."""
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
    entries = state_dict(model, path)
    out = {k: s.transposed() if k.endswith(LINEAR_WEIGHTS) and len(s.shape) == 2 else s
           for k, s in entries.items()}  # fmt: skip
    if not bias:
        for key, s in list(out.items()):
            name = key.removeprefix("_orig_mod.").removeprefix("transformer.")
            missing = key[: -len("weight")] + "bias"
            if name.endswith(".weight") and name not in OUTSIDE_BLOCKS and missing not in out:
                if s.shape:
                    dtype = s.dtype if s.dtype.is_floating_point else torch.float32
                    out[missing] = Stored.of(torch.zeros(s.shape[-1], dtype=dtype))
    return out
