"""An SAE's configuration, as SAELens' ``cfg.json`` says, checked field by field.

Everything read from a file is type- and range-checked here before any tensor is
allocated: widths are bounded (:data:`MAX_D_IN`, :data:`MAX_D_SAE`,
:data:`MAX_PARAMETERS`), the JSON is bounded in size and nesting, and every error is an
:class:`SAEError` that names the field and the fix.

>>> cfg = SAEConfig(d_in=768, d_sae=24576, hook_name="blocks.6.hook_resid_pre")
>>> SAEConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass, field
from typing import Literal

import torch

Architecture = Literal["standard", "topk", "jumprelu", "gated"]
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALISATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# bounds on what a config may ask to allocate (the largest public SAEs are ~2**31 weights)
MAX_D_IN = 1 << 17
MAX_D_SAE = 1 << 24
MAX_PARAMETERS = 1 << 34
MAX_CFG_BYTES = 1 << 20  # a cfg.json is a few hundred bytes; a megabyte is plenty
MAX_DEPTH = 32  # JSON nesting in cfg.json (SAELens writes 2 levels)
MAX_HOOK_NAME = 256

_show = reprlib.Repr()
_show.maxstring = _show.maxother = 60
_show.maxlevel = 2


class SAEError(ValueError):
    """A file, folder or config that is not an SAE resid can read, or an SAE that does not
    fit the model it is attached to; the message says why and what to do."""


def show(value: object) -> str:
    """A short ``repr`` for error messages (long or deeply nested values are cut)."""
    return _show.repr(value)


def _depth(value: object, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of a JSON value, counted without recursion (stops past ``limit``)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str | bytes, source: str) -> object:
    """``json.loads`` with resid's limits: at most :data:`MAX_CFG_BYTES`, nested at most
    :data:`MAX_DEPTH` deep, numbers finite; anything else is an :class:`SAEError`."""
    if len(text) > MAX_CFG_BYTES:
        raise SAEError(
            f"{source} is {len(text)} bytes, more than an SAE config's limit of "
            f"{MAX_CFG_BYTES}: it is not an SAELens cfg.json"
        )

    def finite(token: str) -> float:
        raise ValueError(f"{token} is not a number JSON allows")

    try:
        value = json.loads(text, parse_constant=finite)
    except RecursionError:
        raise SAEError(
            f"cannot read {source} as JSON: nested deeper than Python can parse (an SAE config "
            f"nests {MAX_DEPTH} levels at most)"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, huge ints, NaN
        raise SAEError(f"cannot read {source} as JSON: {e}") from None
    if _depth(value) > MAX_DEPTH:
        raise SAEError(
            f"{source} nests JSON deeper than {MAX_DEPTH} levels: it is not an SAELens cfg.json"
        )
    return value


def _positive_int(where: str, name: str, value: object, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise SAEError(
            f"{where}: {name} must be a positive integer (at most {limit}), not {show(value)}"
        )


@dataclass(frozen=True)
class SAEConfig:
    """An SAE's shape and behaviour, as SAELens' ``cfg.json`` says.

    ``normalize_activations``: ``"none"``; ``"expected_average_only_in"`` (a constant
    input scale that SAELens folds into the weights, so nothing at run time, as there);
    ``"constant_norm_rescale"`` (each input scaled to norm ``sqrt(d_in)``, the output
    scaled back); ``"layer_norm"`` (each input centred and divided by its std + 1e-5, the
    output multiplied back and re-centred). ``reshape_activations="hook_z"`` flattens the
    heads of a ``hook_z`` site (``d_in = n_heads * d_head``).

    >>> SAEConfig(d_in=768, d_sae=24576, architecture="topk", hook_name="blocks.6.hook_resid_pre", k=32)
    """

    d_in: int
    d_sae: int
    hook_name: str
    architecture: Architecture = "standard"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: Literal["none", "hook_z"] = "none"
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)  # kept as read, written back by save

    def __post_init__(self):
        where = "the SAE config"
        _positive_int(where, "d_in", self.d_in, MAX_D_IN)
        _positive_int(where, "d_sae", self.d_sae, MAX_D_SAE)
        if self.d_in * self.d_sae > MAX_PARAMETERS:
            raise SAEError(
                f"{where}: d_in * d_sae = {self.d_in * self.d_sae} weights is more than "
                f"resid's limit of {MAX_PARAMETERS}"
            )
        if (
            not isinstance(self.hook_name, str)
            or not 0 < len(self.hook_name) <= MAX_HOOK_NAME
            or not self.hook_name.isprintable()
        ):
            raise SAEError(
                f"{where}: the hook name (metadata.hook_name) must be a printable string of "
                f"1 to {MAX_HOOK_NAME} characters, not {show(self.hook_name)}"
            )
        for name, allowed in (
            ("architecture", ARCHITECTURES),
            ("normalize_activations", NORMALISATIONS),
            ("reshape_activations", RESHAPES),
            ("dtype", tuple(DTYPES)),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                hint = ""
                if value == "covariance_whitening":
                    hint = " (SAELens folds the whitening into the weights: save the folded SAE)"
                what = "unknown architecture" if name == "architecture" else f"unknown {name}"
                raise SAEError(
                    f"{where}: {what} {show(value)}{hint}; resid knows {', '.join(allowed)}"
                )
        if self.architecture == "topk":
            _positive_int(where, "k (a top-k SAE's)", self.k, self.d_sae)
        elif self.k is not None and not (isinstance(self.k, int) and not isinstance(self.k, bool)):
            raise SAEError(f"{where}: k must be an integer or absent, not {show(self.k)}")
        for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if not isinstance(getattr(self, name), bool):
                raise SAEError(
                    f"{where}: {name} must be true or false, not {show(getattr(self, name))}"
                )
        if not isinstance(self.metadata, dict) or _depth(self.metadata) > MAX_DEPTH:
            raise SAEError(
                f"{where}: metadata must be a JSON object nested at most {MAX_DEPTH} deep"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape (what ``sae_weights.safetensors`` holds)."""
        d, n = self.d_in, self.d_sae
        shapes = {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,)}
        if self.architecture == "gated":
            shapes |= {"b_gate": (n,), "r_mag": (n,), "b_mag": (n,)}
        else:
            shapes["b_enc"] = (n,)
        if self.architecture == "jumprelu":
            shapes["threshold"] = (n,)
        return shapes

    @classmethod
    def from_dict(cls, cfg: object, source: str = "cfg.json") -> SAEConfig:
        """Read SAELens' ``cfg.json`` (v6, or the flat layout of earlier versions); every
        field is type- and range-checked, and an error names ``source``.

        >>> SAEConfig.from_dict(json.loads(Path("sae/cfg.json").read_text()))
        """
        if not isinstance(cfg, dict):
            raise SAEError(
                f"{source} must hold a JSON object (SAELens' SAE config), not a "
                f"{type(cfg).__name__}"
            )
        if _depth(cfg) > MAX_DEPTH:
            raise SAEError(f"{source} nests JSON deeper than {MAX_DEPTH} levels")
        metadata = cfg.get("metadata", {})
        if not isinstance(metadata, dict):
            raise SAEError(f"{source}: metadata must be an object, not {type(metadata).__name__}")
        if "model_from_pretrained_kwargs" in cfg and "model_from_pretrained_kwargs" not in metadata:
            # before SAELens 6 it sat beside the fields; resid.sae.processing reads it here
            metadata = {
                **metadata,
                "model_from_pretrained_kwargs": cfg["model_from_pretrained_kwargs"],
            }
        hook_name = metadata.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
        head = metadata.get("hook_head_index", cfg.get("hook_head_index"))
        if head is not None:
            raise SAEError(
                f"{source}: SAEs of one head (hook_head_index={show(head)}) are not supported"
            )
        arch = cfg.get("architecture", "standard")
        k = cfg.get("k")
        activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if activation == "topk":  # before SAELens 6: top-k was an activation function
            kwargs = cfg.get("activation_fn_kwargs") or {}
            arch, k = "topk", kwargs.get("k", k) if isinstance(kwargs, dict) else k
        elif activation not in ("relu", None):
            raise SAEError(f"{source}: unknown activation function {show(activation)}")
        norm = cfg.get("normalize_activations", "none")
        if norm is None or norm is False:
            norm = "none"
        elif norm is True:
            norm = "expected_average_only_in"
        reshape = cfg.get("reshape_activations")
        if reshape is None:
            z = isinstance(hook_name, str) and hook_name.endswith("hook_z")
            reshape = "hook_z" if z else "none"
        dtype = cfg.get("dtype", "float32")
        if isinstance(dtype, str):
            dtype = dtype.removeprefix("torch.")
        fields = dict(
            d_in=cfg.get("d_in"),
            d_sae=cfg.get("d_sae"),
            hook_name=hook_name,
            architecture=arch,
            k=k,
            rescale_acts_by_decoder_norm=cfg.get("rescale_acts_by_decoder_norm", False),
            apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
            normalize_activations=norm,
            reshape_activations=reshape,
            dtype=dtype,
            metadata=dict(metadata),
        )
        try:
            return cls(**fields)
        except SAEError as e:
            raise SAEError(str(e).replace("the SAE config", source, 1)) from None

    def to_dict(self) -> dict:
        """SAELens 6's ``cfg.json``.

        >>> json.dumps(sae.cfg.to_dict())
        """
        out = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
            # SAELens reads a config without a version as the flat pre-6 layout
            "metadata": {"sae_lens_version": "6.0.0", **self.metadata, "hook_name": self.hook_name},
            "architecture": self.architecture,
        }
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out
