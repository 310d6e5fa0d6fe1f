"""Deprecated: ``resid.model``, a module of the flat layout, is now ``resid.core.model``
(the layer kernels it held are in ``resid.core.layers``).

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core import config as _config
from resid.core import inputs as _inputs
from resid.core import layers as _layers
from resid.core import model as _new
from resid.core.deprecation import forwarded

__getattr__, __all__ = forwarded(
    __name__,
    _new,
    {
        "Config": (_config.Config, "resid.Config"),
        "LayerNorm": (_layers.LayerNorm, "resid.core.layers.LayerNorm"),
        "Attention": (_layers.Attention, "resid.core.layers.Attention"),
        "MLP": (_layers.MLP, "resid.core.layers.MLP"),
        "Block": (_layers.Block, "resid.core.layers.Block"),
        "affine": (_layers.affine, "resid.core.layers.affine"),
        "Input": (_inputs.Input, "resid.core.inputs.Input"),
    },
)
