"""Transcoders: sparse dictionaries that read one site and write another.

A transcoder stands in for a block's MLP: it reads what the MLP reads (``ln2``'s input,
``blocks.L.hook_resid_mid`` or ``blocks.L.hook_mlp_in``, or its output before the gain,
``blocks.L.ln2.hook_normalized``) and writes what the MLP writes (``blocks.L.hook_mlp_out``).
Feature ``i`` reads along ``W_enc[:, i]`` and writes ``W_dec[i]`` per unit of activation::

    acts_pre = x @ W_enc + b_enc                      (hook_acts_pre)
    acts     = f(acts_pre)                             (hook_acts; ReLU, JumpReLU or top-k)
    recons   = acts @ W_dec + b_dec [+ x @ W_skip]     (hook_recons; W_skip: a skip transcoder)
    error    = mlp_out - recons                        (hook_error)

Spliced (``with model.saes(transcoders):``) it records its input at the read site and
replaces the output at the write site with ``recons + error`` (exactly the MLP's output,
so the logits do not change; ``use_error_term=False`` keeps ``recons`` only). Its hook
points are named after the read site: ``blocks.1.ln2.hook_normalized.transcoder.hook_acts``.
As for SAEs, with the error term kept the features read their input as a constant, so
the gradient reaches the stream below through the MLP (the error term) once, and each
feature's activation gets its own gradient through ``W_dec``.

>>> tc = Transcoder(TranscoderConfig(d_in=64, d_sae=256, d_out=64,
...                 hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"))
>>> with model.saes([tc]):
...     logits, cache = model.run_with_cache(tokens)
>>> cache["blocks.1.ln2.hook_normalized.transcoder.hook_acts"].shape   # [batch, pos, 256]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core import names
from resid.core.hooks import HookFn, HookPoint
from resid.core.layers import affine
from resid.core.protocols import ModelLike
from resid.sae.config import DTYPES, MAX_D_IN, MAX_D_SAE, MAX_PARAMETERS, SAEError, show
from resid.sae.dictionary import SUFFIXES, DictionaryModule

ARCHITECTURES = ("relu", "jumprelu", "topk")
# the sites of block L a transcoder may read (the MLP's input, before or inside ln2) and write
READ_SITES = ("hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized")
WRITE_SITES = ("hook_mlp_out",)


def _positive(name: str, value: object, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise SAEError(
            f"the transcoder config: {name} must be a positive integer (at most {limit}), "
            f"not {show(value)}"
        )


def _block_site(name: object, allowed: tuple[str, ...], what: str) -> int:
    """The block of ``name`` if it is ``blocks.L.<one of allowed>``, else an SAEError."""
    ok = isinstance(name, str) and name.startswith("blocks.") and name.count(".") >= 2
    layer, _, rest = name.removeprefix("blocks.").partition(".") if ok else ("", "", "")
    if not (layer.isdigit() and rest in allowed):
        spelled = ", ".join(f"blocks.L.{s}" for s in allowed)
        raise SAEError(f"a transcoder's {what} must be one of {spelled}, not {show(name)}")
    return int(layer)


@dataclass(frozen=True)
class TranscoderConfig:
    """A transcoder's shape: it reads ``hook_name`` (width ``d_in``) and writes
    ``hook_name_out`` (width ``d_out``) of the same block, with ``d_sae`` features.
    ``architecture``: ``"relu"``, ``"jumprelu"`` (a ``threshold`` per feature) or
    ``"topk"`` (``k`` features per token); ``skip=True`` adds the linear term ``x @ W_skip``.

    >>> TranscoderConfig(d_in=576, d_sae=2304, d_out=576,
    ...                  hook_name="blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out")
    """

    d_in: int
    d_sae: int
    d_out: int
    hook_name: str
    hook_name_out: str
    architecture: Literal["relu", "jumprelu", "topk"] = "relu"
    k: int | None = None
    skip: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        _positive("d_in", self.d_in, MAX_D_IN)
        _positive("d_out", self.d_out, MAX_D_IN)
        _positive("d_sae", self.d_sae, MAX_D_SAE)
        if (self.d_in + self.d_out) * self.d_sae > MAX_PARAMETERS:
            raise SAEError(f"the transcoder config: more than {MAX_PARAMETERS} weights")
        read = _block_site(self.hook_name, READ_SITES, "input site (hook_name)")
        write = _block_site(self.hook_name_out, WRITE_SITES, "output site (hook_name_out)")
        if read != write:
            raise SAEError(
                f"a transcoder reads and writes one block's MLP: {self.hook_name} and "
                f"{self.hook_name_out} are in blocks {read} and {write} (cross-layer "
                "transcoders are not supported)"
            )
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"the transcoder config: unknown architecture {show(self.architecture)}; "
                f"resid knows {', '.join(ARCHITECTURES)}"
            )
        if self.architecture == "topk":
            _positive("k (a top-k transcoder's)", self.k, self.d_sae)
        if not isinstance(self.skip, bool):
            raise SAEError(f"the transcoder config: skip must be true or false, not {self.skip!r}")
        if self.dtype not in DTYPES:
            raise SAEError(f"the transcoder config: unknown dtype {show(self.dtype)}")

    @property
    def layer(self) -> int:
        """The block whose MLP it replaces."""
        return names.layer_of(self.hook_name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape."""
        d, n, o = self.d_in, self.d_sae, self.d_out
        shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, o), "b_dec": (o,)}
        if self.architecture == "jumprelu":
            shapes["threshold"] = (n,)
        if self.skip:
            shapes["W_skip"] = (d, o)
        return shapes

    def to_dict(self) -> dict:
        """The config as a JSON-able dict (``TranscoderConfig(**d)`` reads it back)."""
        return asdict(self)


class Transcoder(DictionaryModule):
    """A per-layer (optionally skip) transcoder: ``W_enc: [d_in, d_sae]``,
    ``b_enc: [d_sae]``, ``W_dec: [d_sae, d_out]``, ``b_dec: [d_out]``, and
    ``W_skip: [d_in, d_out]`` (``x @ W_skip``) for a skip transcoder. Weights start at zero.

    >>> tc = Transcoder(cfg)
    >>> tc(x).shape                        # [..., d_out]: decode(encode(x), x)
    """

    _kind = "transcoder"
    _called = "a transcoder's"

    def __init__(self, cfg: TranscoderConfig):
        if not isinstance(cfg, TranscoderConfig):
            raise TypeError(f"Transcoder takes a TranscoderConfig, not {type(cfg).__name__}")
        super().__init__(cfg)  # parameters, hook points: resid.sae.dictionary

    # -- identity (hook_name, d_sae, model, name_of: resid.sae.dictionary) -------------

    @property
    def hook_name_out(self) -> str:
        """The site it writes (``blocks.L.hook_mlp_out``)."""
        return self.cfg.hook_name_out

    @property
    def layer(self) -> int:
        """The block whose MLP it stands in for."""
        return self.cfg.layer

    @property
    def normalises(self) -> bool:
        """False: a transcoder reads its input as it is (``Feature`` asks)."""
        return False

    def __repr__(self) -> str:
        c = self.cfg
        kind = ("skip " if c.skip else "") + c.architecture
        return f"Transcoder({kind}, d_sae={c.d_sae}, {c.hook_name} -> {c.hook_name_out})"

    # -- the computation -----------------------------------------------------------------

    def flatten(self, x: Tensor) -> Tensor:
        """``x`` as it reads it (unchanged: a transcoder reads one vector per token)."""
        return x

    def stats(self, x: Tensor) -> None:
        """None: nothing is scaled back (``Feature`` asks)."""
        return None

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The activation function on pre-activations."""
        if self.cfg.architecture == "relu":
            return torch.relu(pre)
        if self.cfg.architecture == "jumprelu":
            return pre * (pre > self.threshold).to(pre.dtype)
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def _encode(self, x: Tensor, run=None) -> tuple[Tensor, Tensor]:
        h = run or (lambda hp, t: t)
        x = h(self.hook_input, x.to(self.W_enc.dtype))
        pre = h(self.hook_acts_pre, affine(x, self.W_enc, self.b_enc))
        return pre, h(self.hook_acts, self.activate(pre))

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of inputs ``x``; no hooks run.

        >>> tc.encode(cache[tc.hook_name]).shape     # [batch, pos, d_sae]
        """
        return self._encode(self._check(x, self.cfg.d_in, "d_in"))[1]

    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations ``x @ W_enc + b_enc``.

        >>> tc.encode_pre(x).shape                   # [..., d_sae]
        """
        return self._encode(self._check(x, self.cfg.d_in, "d_in"))[0]

    def skip(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The linear skip term ``x @ W_skip`` (zeros for a transcoder without one).

        >>> tc.skip(x).shape                         # [..., d_out]
        """
        if not self.cfg.skip:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return x.to(self.W_skip.dtype) @ self.W_skip

    def write_matrix(self) -> Float[Tensor, "d_sae d_out"]:
        """What each unit of each feature's activation writes: ``W_dec``."""
        return self.W_dec

    def decode(
        self, acts: Float[Tensor, "... d_sae"], x: Tensor | None = None
    ) -> Float[Tensor, "... d_out"]:
        """``acts @ W_dec + b_dec``, plus ``x @ W_skip`` for a skip transcoder (which needs
        the input ``x``).

        >>> tc.decode(tc.encode(x), x)
        """
        self._check(acts, self.d_sae, "d_sae")
        out = affine(acts.to(self.W_dec.dtype), self.W_dec, self.b_dec)
        if self.cfg.skip:
            if x is None:
                raise ValueError(f"{self!r} has a skip term: pass its input, decode(acts, x)")
            out = out + self.skip(self._check(x, self.cfg.d_in, "d_in"))
        return out

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """``decode(encode(x), x)``: its stand-in for the MLP's output, no hooks."""
        return self.decode(self.encode(x), x)

    def _check(self, x: Tensor, width: int, what: str) -> Tensor:
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{self!r} reads float tensors, not {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != width:
            raise ValueError(f"{self!r} takes [..., {what}={width}], got {tuple(x.shape)}")
        return x

    # -- splicing ------------------------------------------------------------------------

    def check_fits(self, model: ModelLike) -> None:
        """Raise :class:`SAEError` unless both its sites are in ``model`` with its widths
        (a transcoder for another model or site is named, with the fix).

        >>> tc.check_fits(model)
        """
        for site, width, what in (
            (self.hook_name, self.cfg.d_in, "reads"),
            (self.hook_name_out, self.cfg.d_out, "writes"),
        ):
            if site not in model.hook_dict:
                raise SAEError(
                    f"{self!r} {what} '{site}', which {model!r} lacks ({model.cfg.n_layers} "
                    "layers, parallel blocks have no hook_resid_mid): it is for another model"
                )
            got = names.width(site, model.cfg)
            if got != width:
                raise SAEError(
                    f"{self!r} {what} width {width}, but '{site}' of {model!r} has width "
                    f"{got}: it was trained on another model"
                )
        self._checked_against(model)

    def splice_hook(self, use_error_term: bool = True) -> HookFn:
        """The read-site hook alone (recording the input); see :meth:`splice_hooks`."""
        return self.splice_hooks(use_error_term)[0][1]

    def splice_hooks(self, use_error_term: bool = True) -> list[tuple[str, HookFn]]:
        """The two forward hooks that splice it in: one at the read site (encode its input),
        one at the write site (replace the MLP's output). ``Model.saes`` attaches both.

        >>> model.run_with_hooks(tokens, fwd_hooks=tc.splice_hooks())
        """
        seen: dict[str, Tensor] = {}

        def transcoder_read(x: Tensor, hook: HookPoint) -> None:
            # with the error term the features read x as a constant (see the module docstring)
            seen["x"] = x.detach().requires_grad_(x.requires_grad) if use_error_term else x

        def transcoder_write(out: Tensor, hook: HookPoint) -> Tensor:
            if "x" not in seen:
                raise RuntimeError(f"{self!r}: its read site did not run before its write site")
            return self._splice(seen.pop("x"), out, use_error_term)

        for fn in (transcoder_read, transcoder_write):
            fn.spliced = self
            fn.use_error_term = use_error_term
        return [(self.hook_name, transcoder_read), (self.hook_name_out, transcoder_write)]

    def _splice(self, x: Tensor, out: Tensor, use_error_term: bool) -> Tensor:
        points = self._points()
        if use_error_term and not any(hp.active for hp in points):
            return out  # recons + (out - recons) with nobody looking: out, exactly
        changed = False

        def run(hp: HookPoint, t: Tensor) -> Tensor:
            nonlocal changed
            seen, edited = hp.see(t)
            changed = changed or edited
            return seen

        _, acts = self._encode(x, run)
        recons = run(self.hook_recons, self.decode(acts, x).to(out.dtype))
        if not use_error_term:
            return recons
        if changed:  # the error term is the clean transcoder's
            with torch.no_grad():
                clean = self.decode(self.encode(x.detach()), x.detach()).to(out.dtype)
        else:
            clean = recons.detach()
        error, edited = self.hook_error.see(out - clean)
        if changed or edited:
            return recons + error
        return out + (recons - recons.detach())  # out exactly, with the features' gradient


__all__ = ["ARCHITECTURES", "READ_SITES", "SUFFIXES", "Transcoder", "TranscoderConfig"]
