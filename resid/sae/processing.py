"""Which weight processing an SAE was trained on, and whether a model has it.

SAELens records how TransformerLens loaded the model an SAE was trained on in its
``cfg.json``: ``metadata.model_from_pretrained_kwargs`` (or, in older flat files,
``model_from_pretrained_kwargs``), e.g. ``{"center_writing_weights": false}``, with the
flags of TransformerLens' weight processing (``fold_ln``, ``center_writing_weights``,
``center_unembed``, ``fold_value_biases``, ``refactor_factored_attn_matrices``). resid
loads exact weights; a model processed with ``resid.process_weights`` lists its steps in
``cfg.processing``. Only the flags a file states are compared: a file that states none
is taken at its word that any model fits.

>>> expected_processing(sae.cfg)                 # {'center_writing_weights': False}
>>> model = processed_for(sae, model)            # the model as the SAE saw it
"""

from __future__ import annotations

import warnings

from resid.core.model import Model
from resid.core.processing import STEPS, process_weights
from resid.core.protocols import ModelLike
from resid.sae.config import SAEConfig, SAEError, show

KWARGS = "model_from_pretrained_kwargs"


def expected_processing(cfg: SAEConfig) -> dict[str, bool]:
    """The processing flags the SAE's ``cfg.json`` states (only those it states).

    >>> expected_processing(sae.cfg)     # {'fold_ln': True, 'center_writing_weights': False}
    """
    found = cfg.metadata.get(KWARGS)  # SAEConfig.from_dict moves a flat file's here
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise SAEError(f"{KWARGS} must be a JSON object, not {show(found)}")
    flags = {}
    for step in STEPS:
        if step in found:
            if not isinstance(found[step], bool):
                raise SAEError(f"{KWARGS}.{step} must be true or false, not {show(found[step])}")
            flags[step] = found[step]
    return flags


def mismatch(cfg: SAEConfig, model: ModelLike) -> dict[str, tuple[bool, bool]]:
    """``{flag: (the SAE's, the model's)}`` for every stated flag the model does not share."""
    applied = set(getattr(model.cfg, "processing", ()))
    return {
        step: (wanted, step in applied)
        for step, wanted in expected_processing(cfg).items()
        if wanted != (step in applied)
    }


def check_processing(cfg: SAEConfig, model: ModelLike, what: str) -> None:
    """Warn, naming ``what`` (the SAE), each flag and the fix, when ``model``'s weight
    processing differs from what the SAE's file says it was trained on: its activations
    would be read in another basis."""
    bad = mismatch(cfg, model)
    if not bad:
        return
    said = ", ".join(f"{k}={v[0]}" for k, v in bad.items())
    has = ", ".join(f"{k}={v[1]}" for k, v in bad.items())
    warnings.warn(
        f"{what} was trained on a model loaded with {said} (its cfg.json's {KWARGS}), but "
        f"this model has {has}: its activations are in another basis and the SAE reads "
        "them wrongly. Splice it into resid.sae.processed_for(sae, model) (which applies "
        "resid.process_weights as the SAE expects).",
        UserWarning,
        stacklevel=3,
    )


def processed_for(sae, model: Model) -> Model:
    """``model`` with the weight processing ``sae``'s file states (``model`` itself when
    it already matches). Steps the file leaves unstated stay as they are in ``model``; a
    step the model has but the SAE's file rules out cannot be undone: load the exact
    weights again.

    >>> model = resid.sae.processed_for(sae, resid.load("gpt2"))
    """
    bad = mismatch(sae.cfg, model)
    if not bad:
        return model
    undo = [k for k, (wanted, _) in bad.items() if not wanted]
    if undo:
        raise SAEError(
            f"{sae!r} was trained without {', '.join(undo)}, which this model has: processing "
            "cannot be undone, so load the exact weights again (resid.load) and process those"
        )
    flags = {step: step in bad for step in STEPS}
    return process_weights(model, **flags)
