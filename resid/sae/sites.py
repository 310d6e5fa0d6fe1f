"""Where an SAE can be spliced: the site's axes and width come from the one table of
hook-site facts (``resid.core.names``), never from the spelling of its name.

An SAE reads one vector per token. At a site of one vector per token (the residual
stream, attention and MLP outputs, MLP activations, a norm's output) its ``d_in`` is
that vector's width; at a per-head site (``hook_z``, ``hook_q``, …) it flattens the
heads (``reshape_activations="hook_z"``) and ``d_in`` is ``heads * d_head``. Anything
else (scores, patterns, norm scales, another SAE's hook points) would break every
forward, so it is refused before anything is attached.

>>> check_fits(model, "blocks.3.attn.hook_z", 768, "hook_z", "SAE(...)")   # fine
>>> check_fits(model, "blocks.3.attn.hook_q", 768, "none", "SAE(...)")     # SAEError
"""

from __future__ import annotations

from resid.core import names
from resid.core.protocols import ModelLike
from resid.sae.config import SAEError


def site_width(model: ModelLike, name: str, reshape: str | None = None) -> int | None:
    """The width of the vector an SAE at hook ``name`` of ``model`` reads (a per-head
    site's heads flattened, unless ``reshape="none"`` says they are not), or ``None`` where
    resid does not splice SAEs.

    >>> site_width(model, "blocks.0.hook_resid_pre") == model.cfg.d_model
    True
    """
    site = names.info(name)
    if reshape is None:
        reshape = "hook_z" if site is not None and site.per_head else "none"
    try:
        check_fits(model, name, None, reshape, "an SAE")
    except SAEError:
        return None
    return names.width(name, model.cfg)


def check_fits(model: ModelLike, name: str, d_in: int | None, reshape: str, what: str) -> None:
    """Raise :class:`SAEError` naming ``what`` (the SAE), the site and the fix unless an
    SAE of width ``d_in`` (``None``: any) and ``reshape_activations`` ``reshape`` can run
    at hook ``name`` of ``model``.

    >>> check_fits(model, "blocks.0.hook_resid_pre", model.cfg.d_model, "none", repr(sae))
    """
    site = names.info(name)
    if site is None or name not in model.hook_dict:
        raise SAEError(
            f"{what} is for '{name}', which is not a hook site of {model!r} that an SAE can "
            "read: use a residual-stream, attention-output, MLP or hook_z site (resid.act_name "
            "spells them)"
        )
    if not site.per_token or site.axes[-1] in ("1", "batch", "pos"):
        raise SAEError(
            f"{what} is for '{name}', which holds {', '.join(site.axes[1:])} (not one vector "
            "per token): an SAE cannot be spliced there; use a residual-stream, "
            "attention-output, MLP or hook_z site"
        )
    width = site.width(model.cfg)
    if site.per_head and reshape != "hook_z":
        raise SAEError(
            f"{what} is for the per-head site '{name}' ({', '.join(site.axes)}) but does not "
            f"flatten the heads (reshape_activations={reshape!r}): it would read d_head vectors "
            f"and break every forward. An SAE there reads all heads at once: set "
            f"reshape_activations='hook_z' with d_in = {width}"
        )
    if not site.per_head and reshape == "hook_z":
        raise SAEError(
            f"{what} flattens heads (reshape_activations='hook_z') but '{name}' has none "
            f"({', '.join(site.axes)}): it was made for an attention hook_z site; splice it "
            "there, or set reshape_activations='none'"
        )
    if d_in is not None and width != d_in:
        raise SAEError(
            f"{what} reads activations of width d_in={d_in}, but '{name}' of {model!r} has "
            f"width {width}: this SAE was trained on another model or site"
        )
