"""SAE features as directions: each reads the stream along one vector and writes another.

>>> f = sae.feature(7)
>>> stream.query(f.read)             # the part of its pre-activation the stream makes
>>> f.activation(cache)              # == cache[sae.name_of("hook_acts")][..., 7]
>>> f.logit_effect(k=5)              # the tokens its write vector raises and lowers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.cache import ActivationCache
from resid.core.neuron import LogitEffect, write_logit_effect
from resid.core.protocols import ModelLike
from resid.core.stream import ResidualStream, State
from resid.sae.config import SAEConfig


@runtime_checkable
class Dictionary(Protocol):
    """What features, attribution and patching need of a sparse dictionary (an SAE, or
    later a transcoder): its config, weights, site, hook names and encoder.
    ``resid.sae.SAE`` is one."""

    cfg: SAEConfig
    W_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor

    @property
    def hook_name(self) -> str: ...

    @property
    def d_sae(self) -> int: ...

    @property
    def model(self) -> ModelLike | None: ...

    @property
    def normalises(self) -> bool: ...

    def name_of(self, suffix: str) -> str: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def write_matrix(self) -> Tensor: ...

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor] | None: ...

    def flatten(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Feature:
    """Feature ``index`` of an SAE: it reads the stream along ``W_enc[:, index]`` and
    writes ``W_dec[index]`` per unit of activation. ``read`` and ``write`` are views of the
    SAE's weights.

    >>> f = sae.feature(7)
    >>> stream.query(f.read)             # the part of its pre-activation the stream makes
    >>> f.activation(cache)              # == cache[sae.name_of("hook_acts")][..., 7]
    """

    sae: Dictionary
    index: int
    model: ModelLike | None = None

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
        self, k: int = 10, model: ModelLike | None = None, through_ln: bool = False
    ) -> LogitEffect:
        """``write @ W_U``, with the ``k`` tokens it raises and lowers most, shown by the
        model's tokenizer (as ids ``<i>`` only for a model with none), exactly as
        ``Neuron.logit_effect`` (``through_ln=True``: through ``ln_final`` as the model's
        norm does it, centred for LayerNorm and not for RMSNorm, times its gain). The model
        is the one given, else the feature's, else the one the SAE was last spliced into.

        >>> sae.feature(7).logit_effect(k=5, model=model)
        """
        model = model or self.model or self.sae.model
        if model is None:
            raise ValueError(
                "logit_effect needs the model's W_U: pass model=, or splice the SAE first"
            )
        if self.write.shape[0] != model.cfg.d_model:
            raise ValueError(
                f"{self.sae!r} writes vectors of width {self.write.shape[0]}, not d_model="
                f"{model.cfg.d_model}: only a residual-stream feature has a logit effect"
            )
        return write_logit_effect(model, self.write, k, through_ln)

    def __repr__(self) -> str:
        return f"Feature({self.index} of {self.sae!r})"
