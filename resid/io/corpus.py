"""Deprecated: corpora are read by :mod:`resid.harvest.corpus` now; this module re-exports
its names and warns."""

import warnings

from resid.harvest.corpus import Corpus, CorpusError, Mode, contexts, open_corpus

warnings.warn(
    "resid.io.corpus moved to resid.harvest.corpus (Corpus, CorpusError, contexts, "
    "open_corpus): import them from there",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Corpus", "CorpusError", "Mode", "contexts", "open_corpus"]
