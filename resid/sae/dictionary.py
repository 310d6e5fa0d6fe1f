"""What every sparse dictionary resid splices has in common: the shared base of
:class:`resid.sae.SAE` and :class:`resid.sae.Transcoder`.

A dictionary holds its config ``cfg``, one parameter per entry of ``cfg.shapes()`` (in
that order, zeros of ``cfg.dtype``: load or train them), one hook point per name in
:data:`SUFFIXES` (addressed as ``f"{hook_name}.{kind}.{suffix}"`` when spliced, where
``kind`` is ``"sae"`` or ``"transcoder"``), and a weak reference to the model it was last
checked against. Each subclass checks its own config's type, and says how it computes,
fits a model and splices in.

>>> tc = Transcoder(cfg)
>>> tc.name_of("hook_acts")            # "blocks.1.ln2.hook_normalized.transcoder.hook_acts"
>>> list(tc.hook_points())[:2]         # ["transcoder.hook_input", "transcoder.hook_acts_pre"]
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from torch import nn

from resid.core.hooks import HookPoint
from resid.core.protocols import ModelLike
from resid.sae.config import DTYPES
from resid.sae.features import Feature

SUFFIXES = ("hook_input", "hook_acts_pre", "hook_acts", "hook_recons", "hook_error")


class DictionaryModule(nn.Module):
    """The parameters, hook points, identity and features of a sparse dictionary read
    from one config (an :class:`~resid.sae.SAEConfig` or a
    :class:`~resid.sae.TranscoderConfig`); :class:`~resid.sae.SAE` and
    :class:`~resid.sae.Transcoder` are the two.

    >>> sae = SAE(SAEConfig(d_in=64, d_sae=512, hook_name="blocks.1.hook_resid_pre"))
    >>> [n for n, _ in sae.named_parameters()]    # ["W_enc", "b_enc", "W_dec", "b_dec"]
    >>> sae.name_of("hook_acts")                  # "blocks.1.hook_resid_pre.sae.hook_acts"
    """

    _kind: ClassVar[str]  # the hook points' infix: "{hook_name}.{_kind}.{suffix}"
    _called: ClassVar[str]  # how an error names its hook points: "an SAE's"

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        for name, shape in cfg.shapes().items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=DTYPES[cfg.dtype])))
        for suffix in SUFFIXES:
            setattr(self, suffix, HookPoint())
        self._model: weakref.ref | None = None

    @property
    def hook_name(self) -> str:
        """The site it reads (an SAE's spliced output replaces it), e.g.
        ``blocks.6.hook_resid_pre`` or ``blocks.6.ln2.hook_normalized``."""
        return self.cfg.hook_name

    @property
    def d_sae(self) -> int:
        """The number of features."""
        return self.cfg.d_sae

    @property
    def model(self) -> ModelLike | None:
        """The model it was last checked against (spliced into), if it is still alive."""
        return self._model() if self._model is not None else None

    def _checked_against(self, model: ModelLike) -> None:
        """Remember ``model`` (weakly) as the one it fits: what :attr:`model` returns."""
        self._model = weakref.ref(model)

    def name_of(self, suffix: str) -> str:
        """The full name of one of its hook points: ``name_of("hook_acts")`` is
        ``"{hook_name}.{kind}.hook_acts"`` (``kind``: ``sae`` or ``transcoder``)."""
        if suffix not in SUFFIXES:
            raise KeyError(f"{self._called} hook points are {', '.join(SUFFIXES)}, not {suffix!r}")
        return f"{self.hook_name}.{self._kind}.{suffix}"

    def hook_points(self) -> dict[str, HookPoint]:
        """Its hook points by suffix, addressed as ``f"{hook_name}.{suffix}"`` when spliced."""
        return {f"{self._kind}.{s}": getattr(self, s) for s in SUFFIXES}

    def _points(self) -> list[HookPoint]:
        """Its hook points, in the order of :data:`SUFFIXES`."""
        return [getattr(self, s) for s in SUFFIXES]

    def feature(self, index: int, model: ModelLike | None = None) -> Feature:
        """Feature ``index``: ``.read`` (``W_enc[:, i]``, in the read site's space),
        ``.write`` (``W_dec[i]``, what it adds to the site it writes), ``.activation(...)``,
        ``.logit_effect(k)``.

        >>> f = sae.feature(12)
        >>> f.activation(cache)                # [batch, pos]
        """
        return Feature(self, index, model)


__all__ = ["SUFFIXES", "DictionaryModule"]
