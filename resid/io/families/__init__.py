"""The model families resid reads, one module each, over one shared reader and converter.

| family | ``architectures`` | module | what differs from GPT-2 |
|---|---|---|---|
| GPT-2 | ``GPT2LMHeadModel`` | ``gpt2`` | (the reference) |
| nanoGPT | ``ckpt.pt`` | ``nanogpt`` | ``nn.Linear`` layout, settings in ``model_args`` |
| GPT-Neo | ``GPTNeoForCausalLM`` | ``neo`` | no q/k/v biases, unscaled attention, local layers |
| Pythia | ``GPTNeoXForCausalLM`` | ``neox`` | partial rotary, parallel attention + MLP, untied |
| Llama, SmolLM | ``LlamaForCausalLM`` | ``llama`` | RMSNorm, rotary (Llama 3), GQA, SwiGLU |
| Mistral | ``MistralForCausalLM`` | ``llama`` | as Llama, with a sliding window |
| Qwen2 | ``Qwen2ForCausalLM`` | ``llama`` | as Llama, with q/k/v biases |

Every tensor's name and shape is checked against the config before anything is built; a
missing, unexpected or mis-shaped key raises ``CheckpointError`` naming it.

>>> cfg = config_from_hf(json.load(open("config.json")))
>>> state = to_resid(weights, cfg)        # resid parameter name -> tensor
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from resid.core.config import Config
from resid.io.checkpoint import stored_of
from resid.io.errors import CheckpointError
from resid.io.families.assemble import check, convert, normalise
from resid.io.families.common import NON_WEIGHTS, Family
from resid.io.families.gpt2 import GPT2
from resid.io.families.llama import LLAMA, MISTRAL, QWEN2
from resid.io.families.neo import NEO
from resid.io.families.neox import NEOX

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, NEO, NEOX, LLAMA, MISTRAL, QWEN2)}
SUPPORTED = {t: f.architecture for t, f in FAMILIES.items()}  # model_type -> architecture
PREFIXES = tuple(dict.fromkeys(p for f in FAMILIES.values() for p in f.prefixes))


def supported() -> str:
    """The architectures resid reads, for error messages."""
    return ", ".join(f"{arch} ({t})" for t, arch in SUPPORTED.items())


def family_of(hf: object, where: str) -> str:
    """The ``model_type`` of a Hugging Face config, if resid supports it."""
    if not isinstance(hf, dict):
        raise CheckpointError(
            f"{where} holds a JSON {type(hf).__name__}, not an object of model settings"
        )
    model_type = hf.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        archs = hf.get("architectures")
        raise CheckpointError(
            f"{where}: {str(archs or model_type)[:100]!r} is not an architecture resid supports; "
            f"it reads {supported()}"
        )
    return model_type


def family(hf: object, where: str) -> Family:
    """The ``Family`` a Hugging Face config names."""
    return FAMILIES[family_of(hf, where)]


def config_from_hf(hf: dict, where: str = "config.json", held: int | None = None) -> Config:
    """resid's ``Config`` for a Hugging Face config of any supported family, every value
    type- and range-checked; ``held`` (the blocks the weights hold) bounds the layer count
    before anything is sized from it."""
    return family(hf, where).config(hf, str(where), held)


def strip_prefix(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the base-model prefix of every key (``lm_head``/``embed_out`` have none)."""
    out = {}
    for k, v in weights.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def to_resid(
    weights: Mapping[str, Tensor],
    cfg: Config,
    source: str = "the checkpoint",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    allow_nonfinite: bool = True,
) -> dict[str, Tensor]:
    """resid's parameters from a family checkpoint's tensors (prefixes allowed), every
    key and shape checked first; ``weights`` is not modified. Biases a family does not have
    are zeros.

    >>> state = to_resid(hf_model.state_dict(), cfg)
    """
    fam = FAMILIES[cfg.architecture]
    entries = normalise(stored_of(weights, source), fam, source)
    params = check(entries, cfg, fam, source)
    if dtype is None:
        dtype = entries[fam.embed].dtype
    return convert(entries, params, cfg, fam, dtype, device, allow_nonfinite, source)


__all__ = [
    "FAMILIES",
    "NON_WEIGHTS",
    "PREFIXES",
    "SUPPORTED",
    "Family",
    "config_from_hf",
    "family",
    "family_of",
    "strip_prefix",
    "supported",
    "to_resid",
]
