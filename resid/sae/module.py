"""The SAE as a torch module, and its splice into a model's forward.

An SAE is a wider, sparser layer that reads an activation and writes it back. Feature
``i`` reads along ``W_enc[:, i]`` and writes ``W_dec[i]`` per unit of activation::

    sae_in   = normalise(x) - b_dec                 (b_dec only if apply_b_dec_to_input)
    acts_pre = sae_in @ W_enc + b_enc                (hook_acts_pre)
    acts     = f(acts_pre)                           (hook_acts; f: ReLU, top-k, JumpReLU, gated)
    recons   = denormalise(acts @ W_dec + b_dec)     (hook_recons)
    error    = x - recons                            (hook_error)

Spliced with ``with model.saes([sae]):`` the SAE replaces the activation at its site with
``recons + error`` (exactly ``x``, so the logits do not change; ``use_error_term=False``
drops the error) and its hook points are sites like any other (their names, and SAELens'
``HookedSAETransformer`` names)::

    {site}.sae.hook_input     hook_sae_input       what the SAE reads, before normalising
    {site}.sae.hook_acts_pre  hook_sae_acts_pre    [batch, pos, d_sae]
    {site}.sae.hook_acts      hook_sae_acts_post   [batch, pos, d_sae]
    {site}.sae.hook_recons    hook_sae_recons      [batch, pos, d_in], after denormalising
    {site}.sae.hook_error     hook_sae_error       [batch, pos, d_in]
    {site}                    hook_sae_output      the spliced output (hooks attached inside
                                                   the ``with`` block see it)

Gradients. With the error term kept, the SAE reads its input as a constant: the gradient
that reaches the site from above flows on unchanged (the derivative of ``recons + error``
with respect to ``x`` is the identity, as in the unspliced model), while each feature's
activation gets its own gradient through ``W_dec``. So attribution patching at sites
before the SAE gives the same estimates spliced or not. (SAELens computes its error term
under ``no_grad``, so there the gradient below the SAE passes through its features only.)

Subclasses. The computation is split so that a dictionary reading one site and writing
another (a transcoder: reads ``ln2``'s input, writes ``hook_mlp_out``, with an optional
linear skip ``x @ W_skip``) can reuse it: ``cfg.shapes()`` (its parameters; ``W_dec`` and
``b_dec`` in the output space), ``_encode`` (input -> activations, ``b_dec`` not
subtracted), ``_decode`` (activations -> output), ``write_matrix`` (what attribution and
patching read), and the splice: ``hook_points``, ``check_fits`` and ``splice_hook``.
Features, direct feature attribution and feature patching read only the
``resid.sae.features.Dictionary`` protocol, so they work on such a subclass as they are.
What a transcoder adds is a second hook (record the input at the read site, replace the
output at the write site, keeping ``output - recons`` as the error term); ``Model.saes``
attaches one hook per spliced module today, at ``hook_name``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.cache import ActivationCache
from resid.core.hooks import HookFn, HookPoint
from resid.core.labelled import Labelled
from resid.core.layers import affine
from resid.core.protocols import ModelLike
from resid.sae import processing, sites
from resid.sae.circuits import direct_feature_attribution
from resid.sae.config import SAEConfig, SAEError
from resid.sae.dictionary import SUFFIXES, DictionaryModule

Stats = tuple[Tensor, Tensor] | None  # (mean, scale) a normalising SAE undoes on its output


class SAE(DictionaryModule):
    """A sparse autoencoder (standard, top-k, JumpReLU or gated), as SAELens defines them.

    ``W_enc: [d_in, d_sae]`` (feature ``i`` reads column ``i``), ``W_dec: [d_sae, d_in]``
    (it writes row ``i``), biases ``b_enc: [d_sae]``, ``b_dec: [d_in]``; JumpReLU adds
    ``threshold: [d_sae]``, gated replaces ``b_enc`` with ``b_gate``, ``r_mag``, ``b_mag``.
    Weights start at zero: load them (``resid.sae.load``) or train them.

    >>> sae = SAE(SAEConfig(d_in=64, d_sae=512, hook_name="blocks.1.hook_resid_pre"))
    >>> acts = sae.encode(x)            # [batch, pos, d_sae]
    >>> sae.decode(acts, x).shape       # [batch, pos, d_in]; x gives normalising SAEs their scale
    """

    _kind = "sae"
    _called = "an SAE's"

    def __init__(self, cfg: SAEConfig):
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE takes an SAEConfig, not {type(cfg).__name__}")
        super().__init__(cfg)  # parameters, hook points: resid.sae.dictionary

    # -- identity (hook_name, d_sae, model, name_of: resid.sae.dictionary) -------------

    @property
    def d_in(self) -> int:
        """The width it reads (``n_heads * d_head`` for a ``hook_z`` SAE)."""
        return self.cfg.d_in

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.architecture == "topk" else ""
        return (
            f"SAE({c.architecture}{k}, d_in={c.d_in}, d_sae={c.d_sae}, hook_name={c.hook_name!r})"
        )

    # -- the computation -----------------------------------------------------------------

    def flatten(self, x: Tensor) -> Tensor:
        """``x`` as the SAE reads it: a ``hook_z`` SAE's heads flattened into one axis."""
        if self.cfg.reshape_activations == "hook_z":
            return x.flatten(-2)
        return x

    def _normalise(self, x: Tensor) -> tuple[Tensor, Stats]:
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

    @property
    def normalises(self) -> bool:
        """Whether its output is scaled back by statistics of its input (and so needs it)."""
        return self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")

    def stats(self, x: Tensor) -> Stats:
        """The (mean, scale) its output is denormalised with, from a flattened input ``x``
        (None for an SAE that does not normalise at run time)."""
        return self._normalise(x.to(self.W_enc.dtype))[1] if self.normalises else None

    def _encode(self, x: Tensor, run=None) -> tuple[Tensor, Tensor, Stats]:
        """(acts_pre, acts, stats) of an input ``[..., d_in]`` (already flattened);
        ``run(hook_point, t)`` runs the hook points (none by default)."""
        h = run or (lambda hp, t: t)
        cfg = self.cfg
        x = h(self.hook_input, x.to(self.W_enc.dtype))
        sae_in, stats = self._normalise(x)
        if cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        if cfg.architecture == "gated":
            gate = affine(sae_in, self.W_enc, self.b_gate) > 0
            pre = h(self.hook_acts_pre, affine(sae_in, self.W_enc * self.r_mag.exp(), self.b_mag))
            acts = torch.relu(pre) * gate.to(pre.dtype)
        else:
            pre = h(self.hook_acts_pre, affine(sae_in, self.W_enc, self.b_enc))
            if cfg.architecture == "standard":
                acts = torch.relu(pre)
            elif cfg.architecture == "jumprelu":
                acts = torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
            else:  # top-k: the k largest pre-activations (ReLU'd), the rest zero
                ranked = pre * self.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else pre
                top = ranked.topk(cfg.k, dim=-1, sorted=False)
                acts = torch.zeros_like(ranked).scatter(-1, top.indices, top.values.relu())
        return pre, h(self.hook_acts, acts), stats

    def write_matrix(self) -> Float[Tensor, "d_sae d_in"]:
        """What each unit of each feature's activation adds to the reconstruction:
        ``W_dec`` (for a top-k SAE that ranks by decoder norm, its rows made unit-norm)."""
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        return self.W_dec

    def _decode(self, acts: Tensor, stats: Stats) -> Tensor:
        """``acts @ write_matrix() + b_dec``, denormalised with ``stats``."""
        out = affine(acts, self.write_matrix(), self.b_dec)
        if stats is not None:
            mu, scale = stats
            out = out * scale + mu
        return out

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of activations ``x`` (``[..., n_heads, d_head]`` for a
        ``hook_z`` SAE), SAELens' ``encode``; no hooks run.

        >>> sae.encode(cache[sae.hook_name]).shape       # [batch, pos, d_sae]
        """
        return self._encode(self.flatten(self._check_input(x)))[1]

    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations (``hook_acts_pre``): ``(normalise(x) - b_dec) @ W_enc + b_enc``
        (gated: the magnitude path).

        >>> sae.encode_pre(x).shape                      # [..., d_sae]
        """
        return self._encode(self.flatten(self._check_input(x)))[0]

    def decode(
        self, acts: Float[Tensor, "... d_sae"], x: Tensor | None = None
    ) -> Float[Tensor, "... d_in"]:
        """The reconstruction ``acts @ W_dec + b_dec``, scaled back for a normalising SAE
        (which needs the input ``x`` it encoded) and reshaped for a ``hook_z`` one.

        >>> sae.decode(sae.encode(x), x)
        """
        if not isinstance(acts, Tensor) or acts.shape[-1:] != (self.d_sae,):
            got = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"decode takes activations [..., d_sae={self.d_sae}], got {got}")
        stats = None
        if self.normalises:
            if x is None:
                raise ValueError(
                    f"this SAE normalises its input ({self.cfg.normalize_activations}): pass the "
                    "input it encoded, decode(acts, x), to scale the reconstruction back"
                )
            stats = self.stats(self.flatten(self._check_input(x)))
        out = self._decode(acts.to(self.W_dec.dtype), stats)
        if self.cfg.reshape_activations == "hook_z" and x is not None:
            out = out.view(x.shape)
        return out

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """``decode(encode(x))``: the reconstruction, with no hooks and no error term."""
        flat = self.flatten(self._check_input(x))
        _, acts, stats = self._encode(flat)
        return self._decode(acts, stats).view(x.shape)

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"an SAE reads float activations, not {type(x).__name__}")
        width = x.shape[-2:].numel() if self.cfg.reshape_activations == "hook_z" else x.shape[-1]
        if x.dim() < (2 if self.cfg.reshape_activations == "hook_z" else 1) or width != self.d_in:
            raise ValueError(
                f"{self!r} reads activations of width d_in={self.d_in}, got shape {tuple(x.shape)}"
            )
        return x

    # -- splicing (resid.core.model.Spliceable) -----------------------------------------

    def check_fits(self, model: ModelLike) -> None:
        """Raise :class:`SAEError`, naming the SAE, the site and the fix, unless it can run
        at its site of ``model``: a site whose activation it can read (not scores,
        patterns or scales), of its width, and a ``hook_z`` SAE only where there are heads
        to flatten. Called by ``model.saes`` before anything is attached.

        >>> sae.check_fits(model)
        """
        sites.check_fits(model, self.hook_name, self.d_in, self.cfg.reshape_activations, repr(self))
        processing.check_processing(self.cfg, model, repr(self))  # warns on another basis
        self._checked_against(model)

    def splice_hook(self, use_error_term: bool = True) -> HookFn:
        """The forward hook that splices the SAE in at its site (``Model.saes`` attaches it).

        >>> model.run_with_hooks(tokens, fwd_hooks=[(sae.hook_name, sae.splice_hook())])
        """

        def sae_splice(x: Tensor, hook: HookPoint) -> Tensor:
            return self._splice(x, use_error_term)

        # what resid.sae.circuits reads to find the splices attached in a context
        sae_splice.spliced = self
        sae_splice.use_error_term = use_error_term
        return sae_splice

    def _splice(self, x: Tensor, use_error_term: bool) -> Tensor:
        points = self._points()
        watched = [hp.active or bool(hp.bwd_fns) for hp in points]
        if use_error_term and not any(watched):
            return x  # recons + (x - recons) with nobody looking: x, exactly, at no cost
        changed = False

        def run(hp: HookPoint, t: Tensor) -> Tensor:  # did a hook replace t or write into it?
            nonlocal changed
            out, edited = hp.see(t)
            changed = changed or edited
            return out

        flat = self.flatten(x.to(self.W_dec.device))  # a no-op unless x is on another device
        # With the error term, the features read x as a constant: the gradient from above
        # reaches x through the error term only (see the module docstring).
        reads = flat.detach().requires_grad_(flat.requires_grad) if use_error_term else flat
        _, acts, stats = self._encode(reads, run)
        backward = any(hp.bwd_fns for hp in points)
        if use_error_term and not (changed or backward or watched[3] or watched[4]):
            return x  # only the encoder was observed: no need to decode
        raw = self._decode(acts, stats).to(x).view(x.shape)
        recons = run(self.hook_recons, raw)
        if not use_error_term:
            return recons
        if changed:  # the error term is the clean SAE's, computed without hooks
            with torch.no_grad():
                _, clean_acts, clean_stats = self._encode(reads.detach())
                clean = self._decode(clean_acts, clean_stats).to(x).view(x.shape)
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

    # -- attribution (feature: resid.sae.dictionary) ----------------------------------

    def logit_attribution(
        self, cache: ActivationCache, target: int | str | tuple | Tensor, heads: bool = True
    ) -> Labelled:
        """Direct feature attribution (``resid.sae.circuits.direct_feature_attribution``):
        each active feature's, the decoder bias's and the error term's part of the logit
        (difference) ``target``, beside every later part of the final stream; they sum to it.

        >>> with model.saes([sae]):
        ...     _, cache = model.run_with_cache(tokens)
        >>> sae.logit_attribution(cache, (" Mary", " John")).top(5, pos=-1)
        """
        return direct_feature_attribution(self, cache, target, heads=heads)


__all__ = ["SAE", "SAEError", "SUFFIXES"]
