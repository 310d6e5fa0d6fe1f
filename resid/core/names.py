"""Hook names: one function spells every site, as TransformerLens' ``get_act_name`` does.

>>> act_name("resid_pre", 3)
'blocks.3.hook_resid_pre'
>>> act_name("pattern", 0)
'blocks.0.attn.hook_pattern'
>>> act_name("scale", 2, "ln1")
'blocks.2.ln1.hook_scale'
>>> act_name("normalized")        # no layer: the final LayerNorm
'ln_final.hook_normalized'

Short names are TransformerLens' (``"resid_pre"``, ``"q"``, ``"pattern"``, ``"post"``, …);
a full hook name is returned unchanged.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

# short name -> where it lives inside a block
_IN_BLOCK = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",  # rotary models: q and k after rotation
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
}
_TOP = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}
_LN = ("scale", "normalized")


def act_name(name: str, layer: int | None = None, ln: str | None = None) -> str:
    """The full hook name of a short ``name`` at ``layer``.

    ``ln`` picks a LayerNorm for ``"scale"``/``"normalized"``: ``"ln1"``, ``"ln2"`` (in a
    block), or none with no layer for ``ln_final``.

    >>> act_name("z", 5)
    'blocks.5.attn.hook_z'
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name in _TOP:
        return _TOP[name]
    if name in _LN:
        if layer is None:
            return f"ln_final.hook_{name}"
        if ln not in ("ln1", "ln2"):
            raise ValueError(f"act_name({name!r}, {layer}) needs ln='ln1' or ln='ln2'")
        return f"blocks.{layer}.{ln}.hook_{name}"
    if name not in _IN_BLOCK:
        known = ", ".join([*_TOP, *_IN_BLOCK, *_LN])
        raise KeyError(f"no site called {name!r}: the short names are {known}")
    if layer is None:
        raise ValueError(f"act_name({name!r}) needs a layer")
    return f"blocks.{layer}.{_IN_BLOCK[name]}"


def layer_of(name: str) -> int | None:
    """The block a hook name belongs to, or None (embeddings, ``ln_final``)."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


Where = Literal["pre", "mid", "post", "final"]


class Site(NamedTuple):
    """Where a stream lives: the hook name, the layer and which of the block's three
    streams. The final stream (entering ``ln_final``) is ``blocks.{n_layers-1}.hook_resid_post``
    with ``layer = n_layers`` and ``where = "final"``, as in TransformerLens' accumulated
    residual."""

    name: str
    layer: int
    where: Where


def locate(n_layers: int, layer: int | None, where: str = "pre") -> Site:
    """The site of ``(layer, where)``. ``layer`` may be negative (from the end); ``None``,
    ``where="final"`` or ``(n_layers, "pre")`` mean the final stream."""
    if where not in ("pre", "mid", "post", "final"):
        raise ValueError(f"where must be 'pre', 'mid', 'post' or 'final', not {where!r}")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
        raise TypeError(f"layer must be an int, not {type(layer).__name__}")
    final = Site(act_name("resid_post", n_layers - 1), n_layers, "final")
    if layer is None or where == "final" or (layer == n_layers and where == "pre"):
        if layer not in (None, n_layers, -1) and where == "final":
            raise ValueError(f"the final stream has layer {n_layers} (or None), not {layer}")
        return final
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range: this model has {n_layers} layers "
            f"(0 to {n_layers - 1}, or {n_layers} with where='pre' for the final stream)"
        )
    layer %= n_layers
    return Site(act_name(f"resid_{where}", layer), layer, where)
