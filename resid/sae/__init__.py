"""Sparse autoencoders: load SAELens SAEs, splice them into a model, read their features
as directions, attribute and patch them.

The package, one idea per module:

- ``config``: :class:`SAEConfig` (SAELens' ``cfg.json``, checked field by field) and
  :class:`SAEError`;
- ``module``: :class:`SAE`, the module and its splice (``with model.saes([sae]):``);
- ``dictionary``: what SAEs and transcoders share (parameters from the config, hook
  points, identity, features);
- ``sites``: where an SAE can be spliced (from ``resid.core.names``' table of sites);
- ``features``: :class:`Feature`, a feature as a read and a write direction;
- ``files``: :func:`load` and :func:`save` in SAELens' format, local or from the hub;
- ``processing``: the weight processing an SAE's file says its model had
  (:func:`expected_processing`), a warning when spliced into a model without it, and
  :func:`processed_for` to process the model to match;
- ``transcoder``: :class:`Transcoder` (reads the MLP's input, writes its output) and
  ``transcoder_files`` (:func:`load_transcoders`, :func:`save_transcoders`: circuit-tracer's
  and SAELens' formats);
- ``circuits``: direct feature attribution, :func:`attribute_features`,
  :func:`patch_features` and :func:`feature_circuit`.
- ``training``: training SAEs and transcoders on one process or many (torchrun,
  DistributedDataParallel), with ``training_files``, its checkpoints (``--resume``);
  its data from rows in memory (``training.TensorStreams``), a harvest
  (``resid.harvest.streams.HarvestStreams``) or the model run as it trains
  (``model_streams.ModelStreams``).

>>> sae = resid.sae.load("path/to/sae")          # cfg.json + sae_weights.safetensors
>>> with model.saes([sae]):
...     logits, cache = model.run_with_cache(tokens)
>>> f = sae.feature(12)
>>> f.read.shape, f.write.shape                  # [d_in], [d_in]
>>> f.activation(cache)                          # [batch, pos]
>>> f.logit_effect(k=5, model=model)             # tokens its write vector raises and lowers
>>> sae.logit_attribution(cache, (" Mary", " John")).top(5, pos=-1)
"""

from resid.sae.circuits import (
    FeatureCircuit,
    attribute_features,
    direct_feature_attribution,
    feature_circuit,
    patch_features,
)
from resid.sae.config import SAEConfig, SAEError
from resid.sae.features import Feature
from resid.sae.files import load, save
from resid.sae.module import SAE
from resid.sae.processing import expected_processing, processed_for
from resid.sae.sites import site_width
from resid.sae.transcoder import Transcoder, TranscoderConfig
from resid.sae.transcoder_files import load_transcoders, save_transcoders

__all__ = [
    "SAE",
    "Feature",
    "FeatureCircuit",
    "SAEConfig",
    "SAEError",
    "Transcoder",
    "TranscoderConfig",
    "attribute_features",
    "direct_feature_attribution",
    "expected_processing",
    "feature_circuit",
    "load",
    "load_transcoders",
    "patch_features",
    "processed_for",
    "save",
    "save_transcoders",
    "site_width",
]
