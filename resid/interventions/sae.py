"""Sparse autoencoders on the residual stream: load SAELens SAEs, splice them into a
model, read their features as directions, attribute and patch them.

An SAE is a wider, sparser layer that reads the stream and writes it back. Feature ``i``
reads along ``W_enc[:, i]`` and writes ``W_dec[i]`` per unit of activation; the
reconstruction is ``acts @ W_dec + b_dec``::

    sae_in   = normalise(x) - b_dec                 (b_dec only if apply_b_dec_to_input)
    acts_pre = sae_in @ W_enc + b_enc                (hook_acts_pre)
    acts     = f(acts_pre)                           (hook_acts; f: ReLU, top-k, JumpReLU, gated)
    recons   = denormalise(acts @ W_dec + b_dec)     (hook_recons)
    error    = x - recons                            (hook_error)

Spliced with ``with model.saes([sae]):`` (``resid.core.model.Model.saes``), the SAE
replaces the activation at its site with ``recons + error`` (exactly ``x``, so the
logits do not change; ``use_error_term=False`` drops the error) and its hook points are
sites like any other. Their names, and SAELens' ``HookedSAETransformer`` names::

    {site}.sae.hook_input     hook_sae_input       what the SAE reads, before normalising
    {site}.sae.hook_acts_pre  hook_sae_acts_pre    [batch, pos, d_sae]
    {site}.sae.hook_acts      hook_sae_acts_post   [batch, pos, d_sae]
    {site}.sae.hook_recons    hook_sae_recons      [batch, pos, d_in], after denormalising
    {site}.sae.hook_error     hook_sae_error       [batch, pos, d_in]
    {site}                    hook_sae_output      the spliced output (hooks attached inside
                                                   the ``with`` block see it)

>>> sae = resid.sae.load("path/to/sae")          # cfg.json + sae_weights.safetensors
>>> with model.saes([sae]):
...     logits, cache = model.run_with_cache(tokens)
>>> f = sae.feature(12)
>>> f.read.shape, f.write.shape                  # [d_in], [d_in]
>>> f.activation(cache)                          # [batch, pos]
>>> f.logit_effect(k=5, model=model)             # tokens its write vector raises and lowers

Gradients. With the error term kept, the SAE reads its input as a constant: the gradient
that reaches the site from above flows on unchanged (the derivative of ``recons + error``
with respect to ``x`` is the identity, as in the unspliced model), while each feature's
activation gets its own gradient through ``W_dec``. So attribution patching at sites
before the SAE gives the same estimates spliced or not. (SAELens computes its error term
under ``no_grad``, so there the gradient below the SAE passes through its features only.)

Files are SAELens' (v6 ``cfg.json``; earlier layouts are read too), checked before
anything is allocated: :func:`load` and :func:`save`.

Threads. The splice is a hook, so it belongs to the caller's thread or task like any
other; while spliced, the SAE's hook points are also *named* in ``model.hook_dict`` for
every thread (they only fire where the splice runs).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from resid.analysis.decompose import contributions
from resid.analysis.lens import final_scale, logit_attribution, unembed_direction
from resid.core.cache import ActivationCache
from resid.core.hooks import HookFn, HookPoint
from resid.core.labelled import Labelled, correlation
from resid.core.names import layer_of
from resid.core.neuron import LogitEffect
from resid.core.stream import ResidualStream, State
from resid.interventions.engine import scalar
from resid.interventions.metrics import Metric, MetricFn, as_metric
from resid.interventions.patching import metric_gradients

if TYPE_CHECKING:
    from resid.core.model import Model

Architecture = Literal["standard", "topk", "jumprelu", "gated"]
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALISATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SUFFIXES = ("hook_input", "hook_acts_pre", "hook_acts", "hook_recons", "hook_error")


class SAEError(ValueError):
    """A file, folder or config that is not an SAE resid can read, or an SAE that does not
    fit the model it is attached to; the message says why and what to do."""


# ---- configuration ----------------------------------------------------------------------


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
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SAEError(f"{where}: {name} must be a positive integer, not {v!r}")
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise SAEError(
                f"{where}: the hook name (metadata.hook_name) must be a non-empty string, "
                f"not {self.hook_name!r}"
            )
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"{where}: unknown architecture {self.architecture!r}; resid runs "
                f"{', '.join(ARCHITECTURES)}"
            )
        if self.architecture == "topk":
            k = self.k
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.d_sae:
                raise SAEError(
                    f"{where}: a top-k SAE needs k in [1, d_sae={self.d_sae}], not {k!r}"
                )
        for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if not isinstance(getattr(self, name), bool):
                raise SAEError(
                    f"{where}: {name} must be true or false, not {getattr(self, name)!r}"
                )
        if self.normalize_activations not in NORMALISATIONS:
            hint = ""
            if self.normalize_activations == "covariance_whitening":
                hint = " (SAELens folds the whitening into the weights: save the folded SAE)"
            raise SAEError(
                f"{where}: normalize_activations {self.normalize_activations!r} is not one of "
                f"{', '.join(NORMALISATIONS)}{hint}"
            )
        if self.reshape_activations not in ("none", "hook_z"):
            raise SAEError(
                f"{where}: reshape_activations must be 'none' or 'hook_z', not "
                f"{self.reshape_activations!r}"
            )
        if self.dtype not in _DTYPES:
            raise SAEError(
                f"{where}: dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}"
            )

    @classmethod
    def from_dict(cls, cfg: object, source: str = "cfg.json") -> SAEConfig:
        """Read SAELens' ``cfg.json`` (v6, or the flat layout of earlier versions)."""
        if not isinstance(cfg, dict):
            raise SAEError(
                f"{source} must hold a JSON object (SAELens' SAE config), not a "
                f"{type(cfg).__name__}"
            )
        metadata = cfg.get("metadata", {})
        if not isinstance(metadata, dict):
            raise SAEError(f"{source}: metadata must be an object, not {type(metadata).__name__}")
        hook_name = metadata.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
        head = metadata.get("hook_head_index", cfg.get("hook_head_index"))
        if head is not None:
            raise SAEError(
                f"{source}: SAEs of one head (hook_head_index={head!r}) are not supported"
            )
        arch = cfg.get("architecture", "standard")
        k = cfg.get("k")
        activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if activation == "topk":  # before SAELens 6: top-k was an activation function
            kwargs = cfg.get("activation_fn_kwargs") or {}
            arch, k = "topk", kwargs.get("k", k) if isinstance(kwargs, dict) else k
        elif activation not in ("relu", None):
            raise SAEError(f"{source}: unknown activation function {activation!r}")
        norm = cfg.get("normalize_activations", "none")
        if norm is None or norm is False:
            norm = "none"
        elif norm is True:
            norm = "expected_average_only_in"
        reshape = cfg.get("reshape_activations")
        if reshape is None:
            reshape = "hook_z" if str(hook_name).endswith("hook_z") else "none"
        dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
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
        """SAELens 6's ``cfg.json``."""
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


def _shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d, n = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,)}
    if cfg.architecture == "gated":
        shapes |= {"b_gate": (n,), "r_mag": (n,), "b_mag": (n,)}
    else:
        shapes["b_enc"] = (n,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (n,)
    return shapes


# ---- the module ----------------------------------------------------------------------


class SAE(nn.Module):
    """A sparse autoencoder (standard, top-k, JumpReLU or gated), as SAELens defines them.

    ``W_enc: [d_in, d_sae]`` (feature ``i`` reads column ``i``), ``W_dec: [d_sae, d_in]``
    (it writes row ``i``), biases ``b_enc: [d_sae]``, ``b_dec: [d_in]``; JumpReLU adds
    ``threshold: [d_sae]``, gated replaces ``b_enc`` with ``b_gate``, ``r_mag``, ``b_mag``.
    Weights start at zero: load them (:func:`load`) or train them.

    >>> sae = SAE(SAEConfig(d_in=64, d_sae=512, hook_name="blocks.1.hook_resid_pre"))
    >>> acts = sae.encode(x)            # [batch, pos, d_sae]
    >>> sae.decode(acts, x).shape       # [batch, pos, d_in]; x gives normalising SAEs their scale
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        for name, shape in _shapes(cfg).items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=dtype)))
        for suffix in _SUFFIXES:
            setattr(self, suffix, HookPoint())
        self._model: weakref.ref | None = None

    # -- identity ------------------------------------------------------------------------

    @property
    def hook_name(self) -> str:
        """The site it reads and (spliced) replaces, e.g. ``blocks.6.hook_resid_pre``."""
        return self.cfg.hook_name

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def name_of(self, suffix: str) -> str:
        """The full name of one of its hook points: ``name_of("hook_acts")`` is
        ``"{hook_name}.sae.hook_acts"``."""
        if suffix not in _SUFFIXES:
            raise KeyError(f"an SAE's hook points are {', '.join(_SUFFIXES)}, not {suffix!r}")
        return f"{self.hook_name}.sae.{suffix}"

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.architecture == "topk" else ""
        return (
            f"SAE({c.architecture}{k}, d_in={c.d_in}, d_sae={c.d_sae}, hook_name={c.hook_name!r})"
        )

    # -- the computation -----------------------------------------------------------------

    def _flatten(self, x: Tensor) -> Tensor:
        if self.cfg.reshape_activations == "hook_z":
            return x.flatten(-2)
        return x

    def _normalise(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(normalised x, (mean, scale) to undo it), SAELens' run-time normalisation."""
        norm = self.cfg.normalize_activations
        if norm == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / self.cfg.d_in**0.5
            return x * (1 / scale), (torch.zeros_like(scale), scale)
        if norm == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            centred = x - mu
            std = centred.std(-1, keepdim=True)
            return centred / (std + 1e-5), (mu, std)
        return x, None

    def _encode(self, x: Tensor, run=None):
        """(acts_pre, acts, stats) of an input ``[..., d_in]`` (already flattened);
        ``run(hook_point, t)`` runs the hook points (none by default)."""
        h = run or (lambda hp, t: t)
        cfg = self.cfg
        x = h(self.hook_input, x.to(self.W_enc.dtype))
        sae_in, stats = self._normalise(x)
        if cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        if cfg.architecture == "gated":
            gate = (sae_in @ self.W_enc + self.b_gate) > 0
            pre = h(self.hook_acts_pre, sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            acts = torch.relu(pre) * gate.to(pre.dtype)
        else:
            pre = h(self.hook_acts_pre, _affine(sae_in, self.W_enc, self.b_enc))
            if cfg.architecture == "standard":
                acts = torch.relu(pre)
            elif cfg.architecture == "jumprelu":
                acts = torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
            else:  # top-k: the k largest pre-activations (ReLU'd), the rest zero
                ranked = pre * self._W_dec_norm() if cfg.rescale_acts_by_decoder_norm else pre
                top = ranked.topk(cfg.k, dim=-1, sorted=False)
                acts = torch.zeros_like(ranked).scatter(-1, top.indices, top.values.relu())
        return pre, h(self.hook_acts, acts), stats

    def _W_dec_norm(self) -> Tensor:
        return self.W_dec.norm(dim=-1)

    def _decode(self, acts: Tensor, stats) -> Tensor:
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self._W_dec_norm()
        out = _affine(acts, self.W_dec, self.b_dec)
        if stats is not None:
            mu, scale = stats
            out = out * scale + mu
        return out

    def _stats(self, x: Tensor | None):
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise ValueError(
                    f"this SAE normalises its input ({self.cfg.normalize_activations}): pass the "
                    "input it encoded, decode(acts, x), to scale the reconstruction back"
                )
            return self._normalise(self._flatten(x).to(self.W_enc.dtype))[1]
        return None

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of activations ``x`` (``[..., n_heads, d_head]`` for a
        ``hook_z`` SAE), SAELens' ``encode``; no hooks run.

        >>> sae.encode(cache[sae.hook_name]).shape       # [batch, pos, d_sae]
        """
        return self._encode(self._flatten(self._check_input(x)))[1]

    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations (``hook_acts_pre``): ``(normalise(x) - b_dec) @ W_enc + b_enc``
        (gated: the magnitude path)."""
        return self._encode(self._flatten(self._check_input(x)))[0]

    def decode(
        self, acts: Float[Tensor, "... d_sae"], x: Tensor | None = None
    ) -> Float[Tensor, "... d_in"]:
        """The reconstruction ``acts @ W_dec + b_dec``, scaled back for a normalising SAE
        (which needs the input ``x`` it encoded) and reshaped for a ``hook_z`` one."""
        if not isinstance(acts, Tensor) or acts.shape[-1:] != (self.d_sae,):
            got = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"decode takes activations [..., d_sae={self.d_sae}], got {got}")
        out = self._decode(acts.to(self.W_dec.dtype), self._stats(x))
        if self.cfg.reshape_activations == "hook_z" and x is not None:
            out = out.view(x.shape)
        return out

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """``decode(encode(x))``: the reconstruction, with no hooks and no error term."""
        flat = self._flatten(self._check_input(x))
        _, acts, stats = self._encode(flat)
        return self._decode(acts, stats).view(x.shape)

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"an SAE reads float activations, not {type(x).__name__}")
        width = x.shape[-2:].numel() if self.cfg.reshape_activations == "hook_z" else x.shape[-1]
        if x.dim() == 0 or width != self.d_in:
            raise ValueError(
                f"{self!r} reads activations of width d_in={self.d_in}, got shape {tuple(x.shape)}"
            )
        return x

    # -- splicing (resid.core.model.Spliceable) -----------------------------------------

    def hook_points(self) -> dict[str, HookPoint]:
        """Its hook points by suffix, addressed as ``f"{hook_name}.{suffix}"`` when spliced."""
        return {f"sae.{s}": getattr(self, s) for s in _SUFFIXES}

    def check_fits(self, model: Model) -> None:
        """Raise :class:`SAEError` naming the SAE and the model if it cannot run at its
        site of ``model`` (another width, a site of another kind)."""
        width = site_width(model, self.hook_name)
        if width is None:
            raise SAEError(
                f"{self!r} reads '{self.hook_name}', a site resid cannot splice an SAE into: "
                "use a residual-stream, attention-output, MLP or hook_z site"
            )
        if width != self.d_in:
            raise SAEError(
                f"{self!r} reads activations of width d_in={self.d_in}, but '{self.hook_name}' "
                f"of {model!r} has width {width}: this SAE was trained on another model"
            )
        self._model = weakref.ref(model)

    def splice_hook(self, use_error_term: bool = True) -> HookFn:
        """The forward hook that splices the SAE in at its site (``Model.saes`` attaches it)."""

        def sae_splice(x: Tensor, hook: HookPoint) -> Tensor:
            return self._splice(x, use_error_term)

        return sae_splice

    def _splice(self, x: Tensor, use_error_term: bool) -> Tensor:
        points = [getattr(self, suffix) for suffix in _SUFFIXES]
        watched = [hp.active or bool(hp.bwd_fns) for hp in points]
        if use_error_term and not any(watched):
            return x  # recons + (x - recons) with nobody looking: x, exactly, at no cost
        changed = False

        def run(hp: HookPoint, t: Tensor) -> Tensor:  # did a hook replace t or write into it?
            nonlocal changed
            out, edited = hp.see(t)
            changed = changed or edited
            return out

        flat = self._flatten(x)
        # With the error term, the features read x as a constant: the gradient from above
        # reaches x through the error term only (see the module docstring).
        reads = flat.detach().requires_grad_(flat.requires_grad) if use_error_term else flat
        _, acts, stats = self._encode(reads, run)
        backward = any(hp.bwd_fns for hp in points)
        if use_error_term and not (changed or backward or watched[3] or watched[4]):
            return x  # only the encoder was observed: no need to decode
        raw = self._decode(acts, stats).to(x.dtype).view(x.shape)
        recons = run(self.hook_recons, raw)
        if not use_error_term:
            return recons
        if changed:  # the error term is the clean SAE's, computed without hooks
            with torch.no_grad():
                _, clean_acts, clean_stats = self._encode(reads.detach())
                clean = self._decode(clean_acts, clean_stats).to(x.dtype).view(x.shape)
        else:
            clean = recons.detach()
        error = x - clean
        hooked_error, error_edited = self.hook_error.see(error)
        if changed or error_edited:
            return recons + hooked_error
        if not (recons.requires_grad or hooked_error.requires_grad):
            return x  # recons + (x - recons), exactly: the logits do not change
        # the same value, x, exactly, with the gradient of recons + error
        return x.detach() + (recons - recons.detach()) + (hooked_error - hooked_error.detach())

    # -- features as directions ----------------------------------------------------------

    def feature(self, index: int, model: Model | None = None) -> Feature:
        """Feature ``index``: ``.read`` (``W_enc[:, i]``), ``.write`` (``W_dec[i]``),
        ``.activation(...)``, ``.logit_effect(k)``.

        >>> f = sae.feature(12)
        >>> f.activation(cache)                # [batch, pos]
        """
        return Feature(self, index, model)

    def logit_attribution(
        self, cache: ActivationCache, target: int | str | tuple | Tensor, heads: bool = True
    ) -> Labelled:
        """Direct feature attribution: each active feature's write vector times its
        activation, through ``ln_final`` (centred, divided by the final scale, times the
        gain), onto ``target`` (a token, a pair ``(a, b)`` for a logit difference, or a
        direction), ``[component, batch, pos]``.

        Parts: ``F{i}`` for each feature active somewhere in the batch, ``sae.b_dec``,
        ``sae.error`` (when spliced with the error term), then every later part of the
        final stream (heads, MLPs, …) and ``ln_final.b``: they sum to the logit
        (difference) at every position. For a residual-stream site; the cache must come
        from a run with the SAE spliced, holding its ``hook_acts``, ``hook_error`` (and
        ``hook_input`` for a normalising SAE) and what ``logit_attribution`` needs.

        >>> with model.saes([sae]):
        ...     _, cache = model.run_with_cache(tokens)
        >>> dfa = sae.logit_attribution(cache, (" Mary", " John"))
        >>> dfa.top(5, pos=-1)
        """
        model = cache.model
        m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)", self.hook_name)
        if m is None:
            raise ValueError(
                f"direct feature attribution needs an SAE on the residual stream, not "
                f"'{self.hook_name}': its writes reach the logits only through later layers"
            )
        acts_name = self.name_of("hook_acts")
        needed = [acts_name]
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            needed.append(self.name_of("hook_input"))
        cache.require(
            needed, "direct feature attribution", f"[..., {needed!r}] with the SAE spliced"
        )
        acts = cache[acts_name]
        ref = acts
        u = unembed_direction(model, target, acts.shape[0]).to(ref)
        wu = u * model.ln_final.w.detach().to(ref)
        direction = wu - wu.mean(-1, keepdim=True)  # [batch, d_model]
        scale = final_scale(cache)[..., 0].to(ref)  # [batch, pos]
        stats = None
        if len(needed) > 1:
            stats = self._normalise(cache[needed[1]].to(self.W_enc.dtype))[1]
        out_scale = stats[1][..., 0] if stats is not None else torch.ones_like(scale)
        with torch.no_grad():
            W_dec = self.W_dec.detach().to(ref)
            if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
                W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
            active = (acts != 0).flatten(0, -2).any(0).nonzero()[:, 0]
            per_feature = torch.einsum(
                "bpf,fd,bd->fbp", acts[..., active], W_dec[active], direction
            )
            parts = [per_feature * (out_scale / scale)]
            labels = [f"F{i}" for i in active.tolist()]
            b_dec = self.b_dec.detach().to(ref) @ direction.T  # [batch]
            parts.append((b_dec[:, None] * out_scale / scale)[None])
            labels.append("sae.b_dec")
            if stats is not None and self.cfg.normalize_activations == "layer_norm":
                mu = stats[0][..., 0] * direction.sum(-1)[:, None]
                parts.append((mu / scale)[None])
                labels.append("sae.norm_mean")
            if self.name_of("hook_error") in cache:
                error = cache[self.name_of("hook_error")].to(ref)
                parts.append((torch.einsum("bpd,bd->bp", error, direction) / scale)[None])
                labels.append("sae.error")
            full = logit_attribution(cache, target, heads=heads)
            before = contributions(cache, int(m[1]), m[2], heads=heads, direction=direction)
            skip = set(before.labels)
            keep = [i for i, lab in enumerate(full.labels) if lab not in skip]
            parts.append(full.values[keep].to(ref))
            labels += [full.labels[i] for i in keep]
        return Labelled.stack(labels, torch.cat(parts), self.hook_name)


@dataclass(frozen=True)
class Feature:
    """Feature ``index`` of an SAE: it reads the stream along ``W_enc[:, index]`` and
    writes ``W_dec[index]`` per unit of activation. ``read`` and ``write`` are views of the
    SAE's weights.

    >>> f = sae.feature(7)
    >>> stream.query(f.read)             # the part of its pre-activation the stream makes
    >>> f.activation(cache)              # == cache[sae.name_of("hook_acts")][..., 7]
    """

    sae: SAE
    index: int
    model: Model | None = None

    def __post_init__(self):
        n = self.sae.d_sae
        if (
            isinstance(self.index, bool)
            or not isinstance(self.index, int)
            or not -n <= self.index < n
        ):
            raise ValueError(f"feature index must be in [0, {n}), not {self.index!r}")
        object.__setattr__(self, "index", self.index % n)

    @property
    def read(self) -> Float[Tensor, " d_in"]:
        """``W_enc[:, i]``: the direction it reads (after the SAE's normalisation and
        ``b_dec`` subtraction)."""
        return self.sae.W_enc[:, self.index]

    @property
    def write(self) -> Float[Tensor, " d_in"]:
        """``W_dec[i]``: what it adds to the reconstruction per unit of activation."""
        return self.sae.W_dec[self.index]

    def activation(
        self, x: ActivationCache | ResidualStream | State | Float[Tensor, "... d_in"]
    ) -> Float[Tensor, "..."] | float:
        """Its activation: from a cache of a spliced run (its ``hook_acts``, else computed
        from the cached site), a stream or State at the SAE's site, or a raw tensor.

        >>> f.activation(cache.stream(1, "pre"))        # [batch, pos]
        """
        sae = self.sae
        if isinstance(x, ActivationCache):
            if sae.name_of("hook_acts") in x:
                return x[sae.name_of("hook_acts")][..., self.index]
            x.require([sae.hook_name], f"feature {self.index}'s activation", f"[{sae.hook_name!r}]")
            x = x[sae.hook_name]
        elif isinstance(x, (ResidualStream, State)):
            if x.site != sae.hook_name:
                raise ValueError(
                    f"{sae!r} reads {sae.hook_name}, not {x.site}: pass that stream, or its "
                    ".tensor to apply the feature to this one anyway"
                )
            x = x.tensor if isinstance(x, ResidualStream) else x.vector
        with torch.no_grad():
            out = sae.encode(x)[..., self.index]
        return out.item() if out.dim() == 0 else out

    def logit_effect(
        self, k: int = 10, model: Model | None = None, through_ln: bool = False
    ) -> LogitEffect:
        """``write @ W_U``, with the ``k`` tokens it raises and lowers most, as ``Neuron``
        does (``through_ln=True``: centred and times ``ln_final``'s gain first). The model
        is the one given, else the one the SAE was last spliced into.

        >>> sae.feature(7).logit_effect(k=5, model=model)
        """
        model = model or self.model or (self.sae._model() if self.sae._model else None)
        if model is None:
            raise ValueError(
                "logit_effect needs the model's W_U: pass model=, or splice the SAE first"
            )
        with torch.no_grad():
            v = self.write.detach().to(model.W_U)
            if v.shape[0] != model.cfg.d_model:
                raise ValueError(
                    f"{self.sae!r} writes vectors of width {v.shape[0]}, not d_model="
                    f"{model.cfg.d_model}: only a residual-stream feature has a logit effect"
                )
            if through_ln:
                v = (v - v.mean()) * model.ln_final.w.detach()
            logits = v @ model.W_U.detach()
            k = min(k, logits.shape[0])
            up, down = logits.topk(k), logits.topk(k, largest=False)
        decode = model.tokenizer.decode_each if model.cfg.d_vocab == 50257 else _ids
        return LogitEffect(
            logits,
            list(zip(decode(up.indices.tolist()), up.values.tolist(), strict=True)),
            list(zip(decode(down.indices.tolist()), down.values.tolist(), strict=True)),
        )

    def __repr__(self) -> str:
        return f"Feature({self.index} of {self.sae!r})"


def _affine(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x @ W + b`` in one fused call (``addmm``) over the flattened leading axes."""
    if x.dim() == 2:
        return torch.addmm(b, x, W)
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[-1])


def _ids(ids: list[int]) -> list[str]:
    return [f"<{i}>" for i in ids]


def site_width(model: Model, name: str) -> int | None:
    """The width of the activation an SAE at hook ``name`` reads, or ``None`` where resid
    does not splice SAEs (patterns, scores, LayerNorm scales)."""
    cfg = model.cfg
    if name.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                      "hook_mlp_out", "hook_embed", "hook_pos_embed", "hook_normalized")):  # fmt: skip
        return cfg.d_model
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return cfg.d_mlp
    if name.endswith(("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")):
        return cfg.n_heads * cfg.d_head
    return None


# ---- files ---------------------------------------------------------------------------


def load(
    path_or_repo: str | Path,
    sae_id: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SAE:
    """An SAE from SAELens' files: a folder with ``cfg.json`` and
    ``sae_weights.safetensors``, or a Hugging Face repo id with the SAE's folder in it
    (``sae_id``), fetched through huggingface_hub's cache (``HF_HUB_OFFLINE=1`` works).

    The config is type- and range-checked, and every tensor's name, shape and dtype against
    it, before any weight is read; weights must be finite.

    >>> sae = resid.sae.load("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")
    >>> sae = resid.sae.load("checkpoints/my-sae", device="cuda")
    """
    folder = _locate(path_or_repo, sae_id)
    cfg_path = folder / CFG_FILE
    weights_path = folder / WEIGHTS_FILE
    for p, what in ((cfg_path, "config"), (weights_path, "weights")):
        if not p.is_file():
            raise SAEError(
                f"{folder} has no {p.name} (the SAE's {what}): an SAELens SAE folder holds "
                f"{CFG_FILE} and {WEIGHTS_FILE}"
            )
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEError(f"cannot read {cfg_path} as JSON: {e}") from None
    cfg = SAEConfig.from_dict(raw, str(cfg_path))
    weights = _read_weights(weights_path, cfg)
    sae = SAE(cfg)
    with torch.no_grad():
        for name, t in weights.items():
            getattr(sae, name).copy_(t)
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a float torch.dtype, not {dtype!r}")
        sae = sae.to(dtype)
        sae.cfg = replace(cfg, dtype=str(dtype).removeprefix("torch."))
    return sae.to(device) if device is not None else sae


def _locate(path_or_repo: str | Path, sae_id: str | None) -> Path:
    path = Path(path_or_repo).expanduser()
    if sae_id is None:
        if path.is_dir():
            return path
        raise SAEError(
            f"'{path_or_repo}' is not a folder: give the folder holding {CFG_FILE} and "
            f"{WEIGHTS_FILE}, or a Hugging Face repo id and the SAE's id in it"
        )
    if path.is_dir():
        folder = (path / sae_id).resolve()
        if not folder.is_relative_to(path.resolve()):
            raise SAEError(f"the SAE id {sae_id!r} leaves the folder {path}")
        return folder
    repo = str(path_or_repo)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or ".." in sae_id.split("/"):
        raise SAEError(f"'{repo}' is neither a folder nor a Hugging Face repo id (owner/name)")
    import huggingface_hub  # only hub names need it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    sub = sae_id.strip("/")
    try:
        root = huggingface_hub.snapshot_download(
            repo, allow_patterns=[f"{sub}/{CFG_FILE}", f"{sub}/{WEIGHTS_FILE}"]
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise SAEError(
            f"could not get the SAE '{sub}' of '{repo}' from the Hugging Face hub, and no copy "
            f"is in the local cache ({type(e).__name__}). Download it once with a network "
            "(unset HF_HUB_OFFLINE), or pass the path of a local SAE folder."
        ) from e
    return Path(root) / sub


def _read_weights(path: Path, cfg: SAEConfig) -> dict[str, Tensor]:
    want = _shapes(cfg)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            extra = keys - set(want)
            if "scaling_factor" in extra:  # SAELens < 6 wrote ones here
                sf = f.get_tensor("scaling_factor")
                if not torch.all(sf == 1):
                    raise SAEError(
                        f"{path} has a scaling_factor that is not all ones (SAELens' old "
                        "fine-tuning scale), which resid does not apply: fold it into W_dec"
                    )
                extra.discard("scaling_factor")
            missing = sorted(set(want) - keys)
            if missing or extra:
                raise SAEError(
                    f"{path} does not match its {cfg.architecture} config: "
                    + "; ".join(
                        s
                        for s in (
                            f"missing {', '.join(missing)}" if missing else "",
                            f"unexpected {', '.join(sorted(extra))}" if extra else "",
                        )
                        if s
                    )
                    + f". A {cfg.architecture} SAE holds {', '.join(want)}"
                )
            bad = [f"{k} {shapes[k]} (want {s})" for k, s in want.items() if shapes[k] != s]
            if bad:
                raise SAEError(
                    f"{path}: tensors of the wrong shape for d_in={cfg.d_in}, d_sae={cfg.d_sae}: "
                    + ", ".join(bad)
                )
            not_float = [k for k in want if not dtypes[k].startswith(("F", "BF"))]
            if not_float:
                raise SAEError(f"{path}: {', '.join(not_float)} must hold floats")
            out = {k: f.get_tensor(k) for k in want}
    except SafetensorError as e:
        raise SAEError(f"{path} is not a safetensors file SAELens wrote: {e}") from None
    bad = [k for k, t in out.items() if not torch.isfinite(t).all()]
    if bad:
        raise SAEError(f"{path}: {', '.join(bad)} hold NaN or infinite values: the SAE is broken")
    return {k: t.to(_DTYPES[cfg.dtype]) for k, t in out.items()}


def save(sae: SAE, folder: str | Path) -> Path:
    """Write ``sae`` in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``) into
    ``folder``, each file written beside its target and renamed into place.

    >>> resid.sae.save(sae, "checkpoints/my-sae")
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(sae, k).detach().cpu().contiguous() for k in _shapes(sae.cfg)}
    cfg = dict(sae.cfg.to_dict(), dtype=str(sae.W_enc.dtype).removeprefix("torch."))
    _atomic(folder / WEIGHTS_FILE, lambda p: save_file(tensors, p))
    _atomic(folder / CFG_FILE, lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
    return folder


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- feature circuits: attribution and patching -----------------------------------------


def _spliced(model: Model, saes: SAE | Sequence[SAE]) -> list[SAE]:
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    if not saes:
        raise ValueError("give at least one SAE")
    for sae in saes:
        if model.hook_dict.get(sae.name_of("hook_acts")) is not sae.hook_acts:
            raise ValueError(
                f"{sae!r} is not spliced into this model: run inside `with model.saes([sae]):`"
            )
    return saes


def _labels(saes: list[SAE]) -> list[str]:
    if len(saes) == 1:
        return [f"F{i}" for i in range(saes[0].d_sae)]
    return [f"{s.hook_name}:F{i}" for s in saes for i in range(s.d_sae)]


def _clean_feature_acts(model: Model, saes: list[SAE], clean, tokens, mask) -> list[Tensor]:
    names = [s.name_of("hook_acts") for s in saes]
    if isinstance(clean, Tensor):
        clean = model.tokens(clean)
        if clean.shape != tokens.shape:
            raise ValueError(
                f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(tokens.shape)} "
                "differ in shape: patching pairs prompts and positions one to one"
            )
        with torch.no_grad():
            _, clean = model.run_with_cache(clean, names_filter=names, attention_mask=mask)
    out = []
    for name in names:
        if name not in clean:
            raise KeyError(f"the clean cache has no '{name}': cache it with the SAE spliced")
        act = clean[name]
        if act.shape[:2] != tokens.shape:
            raise ValueError(
                f"clean '{name}' is {tuple(act.shape)} but the corrupted tokens "
                f"{tuple(tokens.shape)}: pair them one to one"
            )
        out.append(act.to(model.device))
    return out


def attribute_features(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: ActivationCache | Tensor,
    metric: Metric | MetricFn,
    saes: SAE | Sequence[SAE],
    *,
    by_pos: bool = False,
    attention_mask: Tensor | None = None,
) -> Labelled:
    """Attribution patching over every feature of the spliced ``saes`` at once: the
    corrupted metric plus ``grad · (clean - corrupted)`` of each feature's activation, from
    one forward and one backward (under any hooks attached around it). ``[feature]``
    (``[pos, feature]`` with ``by_pos``); with several SAEs the features are concatenated in
    order and labelled ``"{hook_name}:F{i}"``. ``clean`` is a cache of a spliced run or
    clean tokens.

    >>> with model.saes([sae]):
    ...     _, clean_cache = model.run_with_cache(clean)
    ...     est = attribute_features(model, corrupted, clean_cache, metric, [sae])
    >>> est.top(5)
    """
    saes = _spliced(model, saes)
    tokens = model.tokens(corrupted)
    mask = model.check_mask(attention_mask, tokens.shape)
    metric = as_metric(metric)
    clean_acts = _clean_feature_acts(model, saes, clean, tokens, mask)
    names = [s.name_of("hook_acts") for s in saes]
    baseline, acts, grads = metric_gradients(model, tokens, mask, metric, names)
    per_sae = []
    for name, grad, clean_act in zip(names, grads, clean_acts, strict=True):
        prod = (grad * (clean_act.to(grad) - acts[name])).float()
        if mask is not None:
            prod = prod * mask[..., None]
        per_sae.append(prod.sum(0) if by_pos else prod.sum((0, 1)))
    values = torch.cat(per_sae, -1).cpu() + baseline
    axes = ("pos", "feature") if by_pos else ("feature",)
    return Labelled(
        values, axes, {"feature": _labels(saes)}, site=names[0], baseline=float(baseline)
    )


def patch_features(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: ActivationCache | Tensor,
    metric: Metric | MetricFn,
    saes: SAE | Sequence[SAE],
    features: Sequence[int] | Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    chunk: int | None = None,
    max_memory: float = 1e9,
) -> Labelled:
    """Real patching, one feature at a time: the corrupted run with feature ``f``'s
    activation (every position) taken from the clean run, one metric per feature.
    ``features`` index the concatenated features of ``saes``, as in
    :func:`attribute_features` (default: all of them).

    The sweep engine knows only the model's own sites, so the patches run here as batched
    forwards: ``chunk`` copies of the corrupted batch per forward, copy ``j`` patching
    feature ``j`` at the SAE's ``hook_acts``. A run starts at the first block an SAE sits
    in, from the corrupted residual stream, and never recomputes the layers below it.
    Hooks attached around it apply to every copy.

    >>> real = patch_features(model, corrupted, clean_cache, metric, [sae], est_top_indices)
    """
    saes = _spliced(model, saes)
    tokens = model.tokens(corrupted)
    mask = model.check_mask(attention_mask, tokens.shape)
    metric = as_metric(metric)
    clean_acts = _clean_feature_acts(model, saes, clean, tokens, mask)
    sizes = [s.d_sae for s in saes]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    total = int(offsets[-1])
    feats = (
        torch.arange(total)
        if features is None
        else torch.as_tensor(features, dtype=torch.long).flatten()
    )
    if len(feats) and ((feats < 0) | (feats >= total)).any():
        raise IndexError(f"feature indices must be in [0, {total}), got {feats.tolist()[:8]}")
    labels = _labels(saes)
    b, T = tokens.shape
    L = model.cfg.n_layers
    # the first block an SAE sits in (ln_final: after the last); runs start there
    layers = [L if s.hook_name.startswith("ln_final") else layer_of(s.hook_name) for s in saes]
    start = 0 if any(lyr is None for lyr in layers) else min(layers)
    start_name = f"blocks.{start - 1}.hook_resid_post"  # what enters block `start`, unspliced
    with torch.no_grad():
        corr_logits, corr = model.run_with_cache(
            tokens, names_filter=[start_name] if start > 0 else [], attention_mask=mask
        )
        baseline = float(scalar(metric(corr_logits, attention_mask=mask)))
        first = corr[start_name] if start > 0 else None
        width = max(sizes) + model.cfg.d_model * 8 + model.cfg.d_mlp * 2
        per_copy = b * T * (width + model.cfg.d_vocab) * model.W_E.element_size()
        n = chunk or max(1, int(max_memory // per_copy))
        values = torch.empty(len(feats))
        for lo in range(0, len(feats), n):
            part = feats[lo : lo + n]
            k = len(part)
            which = torch.searchsorted(offsets, part, right=True) - 1  # the SAE of each
            hooks = []
            for s_i, sae in enumerate(saes):
                rows = (which == s_i).nonzero()[:, 0]
                if len(rows) == 0:
                    continue
                idx = (part[rows] - offsets[s_i]).to(model.device)
                rows = rows.to(model.device)
                src = clean_acts[s_i]

                def put(act: Tensor, hook, rows=rows, idx=idx, src=src, k=k) -> Tensor:
                    out = act.clone().view(k, b, *act.shape[1:])
                    out[rows, ..., idx] = src[..., idx].to(act).movedim(-1, 0)
                    return out.view(act.shape)

                hooks.append((sae.name_of("hook_acts"), put))
            rep_mask = None if mask is None else mask.repeat(k, 1)
            if start > 0:
                logits = model.run_with_hooks(
                    first.repeat(k, 1, 1),
                    fwd_hooks=hooks,
                    start_at_layer=start,
                    attention_mask=rep_mask,
                )
            else:
                logits = model.run_with_hooks(
                    tokens.repeat(k, 1), fwd_hooks=hooks, attention_mask=rep_mask
                )
            for j, chunk_logits in enumerate(logits.view(k, b, *logits.shape[1:])):
                values[lo + j] = scalar(metric(chunk_logits, attention_mask=mask))
    return Labelled(
        values,
        ("feature",),
        {"feature": [labels[i] for i in feats.tolist()]},
        site=saes[0].name_of("hook_acts"),
        baseline=baseline,
    )


@dataclass(frozen=True)
class FeatureCircuit:
    """What :func:`feature_circuit` found: the attribution estimate of every feature, the
    ``top`` features by it (indices into the concatenated features), their real patching
    values, and the correlation between estimate and real on those."""

    estimate: Labelled
    top: list[int]
    patched: Labelled
    correlation: float

    def table(self) -> list[tuple[str, float, float]]:
        """``(label, estimate, patched)`` for each top feature."""
        labels = self.estimate.labels
        return [
            (labels[i], float(self.estimate.values[i]), float(p))
            for i, p in zip(self.top, self.patched.values, strict=True)
        ]


def feature_circuit(
    model: Model,
    corrupted: Int[Tensor, "batch pos"],
    clean: ActivationCache | Tensor,
    metric: Metric | MetricFn,
    saes: SAE | Sequence[SAE],
    k: int = 20,
    *,
    attention_mask: Tensor | None = None,
) -> FeatureCircuit:
    """Attribute every feature (one forward, one backward), then really patch the ``k``
    whose estimated effect is largest in size, and report how well the two agree.

    >>> with model.saes([sae]):
    ...     _, clean_cache = model.run_with_cache(clean)
    ...     circuit = feature_circuit(model, corrupted, clean_cache, metric, [sae], k=10)
    >>> circuit.correlation, circuit.table()[:3]
    """
    est = attribute_features(model, corrupted, clean, metric, saes, attention_mask=attention_mask)
    effect = (est.values - est.baseline).abs()
    top = effect.topk(min(k, len(effect))).indices.tolist()
    real = patch_features(model, corrupted, clean, metric, saes, top, attention_mask=attention_mask)
    corr = correlation(est.values[top], real.values) if len(top) > 1 else float("nan")
    return FeatureCircuit(est, top, real, corr)


__all__ = [
    "SAE",
    "Feature",
    "FeatureCircuit",
    "SAEConfig",
    "SAEError",
    "attribute_features",
    "feature_circuit",
    "load",
    "patch_features",
    "save",
    "site_width",
]
