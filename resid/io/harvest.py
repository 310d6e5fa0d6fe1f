"""Deprecated: the harvest lives in :mod:`resid.harvest` now (``resid.harvest.run``,
``.store``, ``.stats``, ``.distributed``); this module re-exports its names and warns."""

import warnings

from resid.harvest.distributed import init_distributed
from resid.harvest.errors import HarvestError
from resid.harvest.run import check_sites, harvest, model_fingerprint
from resid.harvest.stats import EMPTY, N_BINS, UnitStats, bin_index, default_edges, magnitude_edges
from resid.harvest.store import (
    VERSION,
    WRITER,
    foreign_files,
    iter_shards,
    load_stats,
    read_harvest,
)

warnings.warn(
    "resid.io.harvest moved to resid.harvest (harvest, load_stats, read_harvest, iter_shards, "
    "HarvestError, UnitStats, init_distributed): import them from there",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "EMPTY",
    "N_BINS",
    "VERSION",
    "WRITER",
    "HarvestError",
    "UnitStats",
    "bin_index",
    "check_sites",
    "default_edges",
    "foreign_files",
    "harvest",
    "init_distributed",
    "iter_shards",
    "load_stats",
    "magnitude_edges",
    "model_fingerprint",
    "read_harvest",
]
