"""A ``Model`` from a family's config and tensors: the one path every format ends in.

``from_hf`` is the entry point for formats other than the files ``resid.load`` reads itself
(GGUF, weights already in memory): a Hugging Face-style config dict and tensors under
``transformers``' names and layouts. Everything is checked before the model is built, and
each parameter is written once, straight into the dtype and onto the device asked for.

>>> model = from_hf(hf_model.config.to_dict(), hf_model.state_dict(), source="hf model")
>>> model = from_hf(config, weights, tokenizer=tok, dtype=torch.bfloat16, source="x.gguf")
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from resid.core.config import Config
from resid.core.model import Model
from resid.core.tokenizer import Tokenizer
from resid.io import checked
from resid.io.checkpoint import Stored, stored_of
from resid.io.families import family
from resid.io.families.assemble import check, convert, normalise
from resid.io.families.common import Family, Param


def build_model(
    entries: dict[str, Stored],
    params: dict[str, Param],
    cfg: Config,
    fam: Family,
    *,
    tokenizer: Tokenizer | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    allow_nonfinite: bool,
    source,
) -> Model:
    """The ``Model`` of normalised checkpoint entries whose names and shapes ``check``
    compared with ``cfg`` (``params`` is what it returned): each parameter converted on its
    own into ``dtype`` (default float32) on ``device`` (default CUDA when there is one).
    Values are checked (finite; a tied unembedding equal to the embedding) unless
    ``resid.io.checked`` holds a record of these very files passing for ``dtype``; a clean
    check leaves one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.float32
    key = checked.record_key(entries.values(), dtype)
    known = key is not None and checked.is_known(key)
    state = convert(entries, params, cfg, fam, dtype, device, allow_nonfinite, source,
                    check_values=not known)  # fmt: skip
    if key is not None and not known and not allow_nonfinite:
        checked.remember(key)  # convert raised had anything failed
    with torch.device("meta"):
        model = Model(cfg, tokenizer=tokenizer)
    _assign(model, state)
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device != device or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
        model = model.to(device=device, dtype=dtype)
    return model


def _assign(model: Model, state: dict[str, Tensor]) -> None:
    """Each of the model's (meta) parameters replaced by its tensor from ``state``, which
    must name exactly those parameters (``load_state_dict(assign=True)``, in one walk)."""
    owners = [
        (module, f"{prefix}.{leaf}" if prefix else leaf, leaf, p.requires_grad)
        for prefix, module in model.named_modules()
        for leaf, p in module.named_parameters(recurse=False)
    ]
    if {name for _, name, _, _ in owners} != state.keys():
        raise RuntimeError("resid's conversion did not build exactly the model's parameters: a bug")
    for module, name, leaf, grad in owners:
        module.register_parameter(leaf, nn.Parameter(state[name], grad))


def from_hf(
    hf_config: dict,
    weights: Mapping[str, Tensor],
    *,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    source: str,
    allow_nonfinite: bool = False,
) -> Model:
    """A ``Model`` from a Hugging Face-style config (``model_type`` one of resid's families)
    and tensors under ``transformers``' names (base-model prefixes allowed) and layouts
    (``nn.Linear`` ``[out, in]``; GPT-2's ``Conv1D`` ``[in, out]``), in any floating dtype.

    ``weights`` is not modified. The layer count is compared with the tensors, then every
    name, shape and dtype, before anything is built; NaN or Inf weights are refused unless
    ``allow_nonfinite``. Every failure is a ``CheckpointError`` naming ``source``.

    >>> hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    >>> model = from_hf(hf.config.to_dict(), hf.state_dict(), source=str(folder))
    """
    fam = family(hf_config, source)
    entries = normalise(stored_of(weights, source), fam, source)
    cfg = fam.config(hf_config, source, fam.held(entries))
    params = check(entries, cfg, fam, source)
    return build_model(entries, params, cfg, fam, tokenizer=tokenizer, dtype=dtype, device=device,
                       allow_nonfinite=allow_nonfinite, source=source)  # fmt: skip
