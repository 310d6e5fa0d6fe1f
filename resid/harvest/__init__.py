"""Corpus-scale harvesting: per-unit statistics and stored activations over a text corpus,
on one process or many (``torchrun``), killable and resumable.

- :mod:`~resid.harvest.stats`: the streaming maths (moments, histogram, exact top-k);
- :mod:`~resid.harvest.store`: the folder format, its one writer and one reader;
- :mod:`~resid.harvest.settings`: the frozen, checked settings of a run;
- :mod:`~resid.harvest.run`: the run itself (:func:`harvest`);
- :mod:`~resid.harvest.distributed`: the torch.distributed plumbing;
- :mod:`~resid.harvest.corpus`: reading a corpus into contexts;
- :mod:`~resid.harvest.activation_store`: a harvest streamed shuffled, for SAE training.
- :mod:`~resid.harvest.streams`: a harvest as seeded streams whose global batches do not
  depend on the number of ranks (distributed SAE training, ``resid.sae.training``).

>>> from resid.harvest import harvest, load_stats, ActivationStore
>>> harvest(model, "corpus.txt", "h", ["blocks.5.mlp.hook_post"], activations=True)
>>> load_stats("h", "blocks.5.mlp.hook_post")["max"]
"""

from resid.harvest.activation_store import ActivationStore
from resid.harvest.corpus import Corpus, CorpusError, contexts, open_corpus
from resid.harvest.distributed import init_distributed
from resid.harvest.errors import HarvestError
from resid.harvest.run import harvest
from resid.harvest.settings import Settings
from resid.harvest.stats import UnitStats, default_edges
from resid.harvest.store import iter_shards, load_stats, read_harvest

__all__ = [
    "ActivationStore",
    "Corpus",
    "CorpusError",
    "HarvestError",
    "Settings",
    "UnitStats",
    "contexts",
    "default_edges",
    "harvest",
    "init_distributed",
    "iter_shards",
    "load_stats",
    "open_corpus",
    "read_harvest",
]
