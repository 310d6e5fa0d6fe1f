"""Hook names and the one table of hook-site facts.

Every site resid hooks is described once, in :data:`SITES`: where it lives (its path
inside a block, or at the top of the model), the axes of its activation (from which its
width, its position axis and its head axis follow) and whether it is kept in fp32. Code
that needs a hook name spells it with :func:`act_name`; code that needs to read one back
(its layer, its axes, its width) asks :func:`parse` or :func:`info`. No other module
writes hook names by hand or parses them with a regex.

>>> act_name("resid_pre", 3)
'blocks.3.hook_resid_pre'
>>> act_name("pattern", 0)
'blocks.0.attn.hook_pattern'
>>> act_name("scale", 2, "ln1")
'blocks.2.ln1.hook_scale'
>>> act_name("normalized")        # no layer: the final LayerNorm
'ln_final.hook_normalized'
>>> info("blocks.3.attn.hook_z").axes
('batch', 'pos', 'head', 'd_head')
>>> parse("blocks.6.hook_resid_pre.sae.hook_acts")
ParsedName(name='blocks.6.hook_resid_pre', layer=6, site=SiteInfo(path='hook_resid_pre', ...), suffix='sae.hook_acts')

Short names are TransformerLens' (``"resid_pre"``, ``"q"``, ``"pattern"``, ``"post"``, …);
a full hook name is returned unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

# an axis of an activation -> the config field that sizes it (None: sized by the input)
_AXIS_SIZE = {
    "batch": None,
    "pos": None,
    "query_pos": None,
    "key_pos": None,
    "d_model": "d_model",
    "d_mlp": "d_mlp",
    "d_head": "d_head",
    "head": "n_heads",
    "kv_head": "kv_heads",
    "1": None,
}
_BY_INPUT = ("batch", "pos", "query_pos", "key_pos")


class SizedConfig(Protocol):
    """The config fields that size a site's axes (``resid.Config`` has them)."""

    d_model: int
    d_mlp: int
    d_head: int
    n_heads: int

    @property
    def kv_heads(self) -> int: ...


@dataclass(frozen=True)
class SiteInfo:
    """The facts of one kind of hook site.

    ``path`` is the name inside block ``l`` (``"attn.hook_z"`` is ``blocks.l.attn.hook_z``)
    or, for a site outside the blocks, the whole name (``"hook_embed"``); ``short`` is
    :func:`act_name`'s short name (``None`` for LayerNorm sites, which need ``ln=``);
    ``axes`` names the activation's axes as jaxtyping would (``"head"`` counts query heads,
    ``"kv_head"`` key/value heads); ``fp32`` says the site is kept in float32 whatever
    the model's dtype (attention scores, patterns and LayerNorm scales).

    >>> SITES["attn.hook_pattern"].head_axis, SITES["attn.hook_pattern"].pos_axis
    (1, 2)
    """

    path: str
    short: str | None
    axes: tuple[str, ...]
    in_block: bool = True
    fp32: bool = False

    @property
    def per_head(self) -> bool:
        """One slice per attention head (q, k, v, z, result, scores, pattern)."""
        return self.head_axis is not None

    @property
    def head_axis(self) -> int | None:
        """The index of the head axis, or ``None``."""
        for a in ("head", "kv_head"):
            if a in self.axes:
                return self.axes.index(a)
        return None

    @property
    def pos_axis(self) -> int:
        """The index of the (query) position axis."""
        return self.axes.index("query_pos" if "query_pos" in self.axes else "pos")

    @property
    def per_token(self) -> bool:
        """One vector per token (not ``[query, key]`` pairs, as scores and patterns are)."""
        return "key_pos" not in self.axes

    def sizes(self, cfg: SizedConfig) -> tuple[int | None, ...]:
        """Each axis' size under ``cfg`` (``None`` for batch and position axes)."""
        return tuple(None if a in _BY_INPUT else _size(cfg, a) for a in self.axes)

    def width(self, cfg: SizedConfig) -> int | None:
        """The length of the vector the site holds per token (the product of its axes after
        batch and position: ``n_heads * d_head`` for ``hook_z``), or ``None`` for a site
        that is not one vector per token (scores, patterns).

        >>> SITES["mlp.hook_post"].width(cfg) == cfg.d_mlp
        True
        """
        if not self.per_token:
            return None
        return math.prod(_size(cfg, a) for a in self.axes if a not in _BY_INPUT)


def _size(cfg: SizedConfig, axis: str) -> int:
    field = _AXIS_SIZE[axis]
    return 1 if field is None else int(getattr(cfg, field))


_D = ("batch", "pos", "d_model")
_MLP = ("batch", "pos", "d_mlp")
_QH = ("batch", "pos", "head", "d_head")
_KVH = ("batch", "pos", "kv_head", "d_head")
_QK = ("batch", "head", "query_pos", "key_pos")
_SCALE = ("batch", "pos", "1")

#: every kind of site, by path; in the order the forward pass reaches them
SITES: dict[str, SiteInfo] = {
    s.path: s
    for s in (
        SiteInfo("hook_tokens", "tokens", ("batch", "pos"), in_block=False),  # token ids
        SiteInfo("hook_embed", "embed", _D, in_block=False),
        SiteInfo("hook_pos_embed", "pos_embed", _D, in_block=False),
        SiteInfo("hook_resid_pre", "resid_pre", _D),
        # each head's copy of the stream attention reads, before ln1 (built when hooked)
        SiteInfo("hook_attn_in", "attn_in", ("batch", "pos", "head", "d_model")),
        SiteInfo("hook_q_input", "q_input", ("batch", "pos", "head", "d_model")),
        SiteInfo("hook_k_input", "k_input", ("batch", "pos", "kv_head", "d_model")),
        SiteInfo("hook_v_input", "v_input", ("batch", "pos", "kv_head", "d_model")),
        SiteInfo("ln1.hook_scale", None, _SCALE, fp32=True),
        SiteInfo("ln1.hook_normalized", None, _D),
        SiteInfo("attn.hook_q", "q", _QH),
        SiteInfo("attn.hook_k", "k", _KVH),
        SiteInfo("attn.hook_v", "v", _KVH),
        SiteInfo("attn.hook_rot_q", "rot_q", _QH),  # rotary models: q and k after rotation
        SiteInfo("attn.hook_rot_k", "rot_k", _KVH),
        SiteInfo("attn.hook_attn_scores", "attn_scores", _QK, fp32=True),
        SiteInfo("attn.hook_pattern", "pattern", _QK, fp32=True),
        SiteInfo("attn.hook_z", "z", _QH),
        SiteInfo("attn.hook_result", "result", ("batch", "pos", "head", "d_model")),
        SiteInfo("hook_attn_out", "attn_out", _D),
        SiteInfo("hook_resid_mid", "resid_mid", _D),
        SiteInfo("hook_mlp_in", "mlp_in", _D),  # the stream the MLP reads, before ln2
        SiteInfo("ln2.hook_scale", None, _SCALE, fp32=True),
        SiteInfo("ln2.hook_normalized", None, _D),
        SiteInfo("mlp.hook_pre", "pre", _MLP),
        SiteInfo("mlp.hook_pre_linear", "pre_linear", _MLP),  # gated MLPs: the other read
        SiteInfo("mlp.hook_post", "post", _MLP),
        SiteInfo("hook_mlp_out", "mlp_out", _D),
        SiteInfo("hook_resid_post", "resid_post", _D),
        SiteInfo("ln_final.hook_scale", None, _SCALE, in_block=False, fp32=True),
        SiteInfo("ln_final.hook_normalized", None, _D, in_block=False),
    )
}

#: short name (``act_name``'s) -> the site's facts; ``"scores"`` is TransformerLens' other
#: name for ``attn_scores``
SHORT: dict[str, SiteInfo] = {s.short: s for s in SITES.values() if s.short is not None}
SHORT["scores"] = SITES["attn.hook_attn_scores"]
_LN = ("scale", "normalized")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def act_name(name: str, layer: int | None = None, ln: str | None = None) -> str:
    """The full hook name of a short ``name`` at ``layer``.

    ``ln`` picks a LayerNorm for ``"scale"``/``"normalized"``: ``"ln1"``, ``"ln2"`` (in a
    block), or none with no layer for ``ln_final``.

    >>> act_name("z", 5)
    'blocks.5.attn.hook_z'
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name in _LN:
        if layer is None:
            return f"ln_final.hook_{name}"
        if ln not in ("ln1", "ln2"):
            raise ValueError(f"act_name({name!r}, {layer}) needs ln='ln1' or ln='ln2'")
        return f"blocks.{layer}.{ln}.hook_{name}"
    if name not in SHORT:
        known = ", ".join([*SHORT, *_LN])
        raise KeyError(f"no site called {name!r}: the short names are {known}")
    path = SHORT[name].path
    if not SHORT[name].in_block:
        return path
    if layer is None:
        raise ValueError(f"act_name({name!r}) needs a layer")
    return f"blocks.{layer}.{path}"


class ParsedName(NamedTuple):
    """A hook name read back: the site's own ``name``, its ``layer`` (``None`` outside the
    blocks), its :class:`SiteInfo`, and what follows the site (``suffix``: ``""``, or
    ``"sae.hook_acts"`` for a hook point a spliced SAE brings)."""

    name: str
    layer: int | None
    site: SiteInfo
    suffix: str


def parse(name: str) -> ParsedName | None:
    """Read a hook name back, or ``None`` if it names no site of the table.

    >>> parse("blocks.3.mlp.hook_post").layer
    3
    >>> parse("blocks.6.hook_resid_pre.sae.hook_acts").suffix
    'sae.hook_acts'
    """
    if not isinstance(name, str):
        return None
    m = _BLOCK.fullmatch(name)
    layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
    for path, site in SITES.items():
        if site.in_block != (layer is not None):
            continue
        if rest == path or rest.startswith(path + "."):
            suffix = rest[len(path) + 1 :]
            return ParsedName(name[: len(name) - len(suffix) - bool(suffix)], layer, site, suffix)
    return None


def info(name: str) -> SiteInfo | None:
    """The facts of the site ``name`` is exactly (``None`` for a name the table does not
    describe, such as a spliced SAE's own hook points).

    >>> info("blocks.0.attn.hook_k").axes
    ('batch', 'pos', 'kv_head', 'd_head')
    """
    p = parse(name)
    return p.site if p is not None and not p.suffix else None


def site_info(name: str) -> SiteInfo:
    """:func:`info`, raising a ``KeyError`` that names the problem for an unknown name."""
    s = info(name)
    if s is None:
        raise KeyError(
            f"'{name}' is not a hook site resid describes: spell it with resid.act_name "
            "(e.g. act_name('resid_pre', 3))"
        )
    return s


def layer_of(name: str) -> int | None:
    """The block a hook name belongs to, or None (embeddings, ``ln_final``).

    >>> layer_of("blocks.4.attn.hook_z"), layer_of("hook_embed")
    (4, None)
    """
    m = _BLOCK.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def width(name: str, cfg: SizedConfig) -> int | None:
    """The per-token width of the activation at ``name`` under ``cfg`` (``None`` for
    scores and patterns, and for names the table does not describe).

    >>> width("blocks.2.attn.hook_z", model.cfg) == model.cfg.n_heads * model.cfg.d_head
    True
    """
    s = info(name)
    return None if s is None else s.width(cfg)


Where = Literal["pre", "mid", "post", "final"]


class Site(NamedTuple):
    """Where a stream lives: the hook name, the layer and which of the block's three
    streams. The final stream (entering ``ln_final``) is ``blocks.{n_layers-1}.hook_resid_post``
    with ``layer = n_layers`` and ``where = "final"``, as in TransformerLens' accumulated
    residual."""

    name: str
    layer: int
    where: Where


_STREAMS = {f"hook_resid_{w}": w for w in ("pre", "mid", "post")}


def stream_site(name: str) -> Site | None:
    """The :class:`Site` of a residual-stream hook name (``blocks.{l}.hook_resid_{where}``),
    or ``None`` for any other name.

    >>> stream_site("blocks.2.hook_resid_mid")
    Site(name='blocks.2.hook_resid_mid', layer=2, where='mid')
    """
    p = parse(name)
    if p is None or p.suffix or p.site.path not in _STREAMS:
        return None
    return Site(name, p.layer, _STREAMS[p.site.path])


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
