"""Attribution graphs: trace one prompt's computation through transcoder features.

- ``attribute``: :func:`attribute` builds the local replacement model (patterns and norm
  scales frozen, MLPs replaced by transcoders plus error terms) on the model's own
  kernels and computes every direct effect between features, errors, tokens and logits;
- ``graph``: :class:`Graph` (nodes, adjacency, pruning, ``save`` as circuit-tracer's
  frontend JSON);
- ``influence``: influence on the logits and pruning, as circuit-tracer defines them;
- ``steering``: intervening on a graph's nodes in the real model and comparing the
  change in the logits with what the graph predicts.

>>> tcs = resid.sae.load_transcoders("transcoders/")
>>> g = resid.graphs.attribute(model, tcs, "The capital of France is")
>>> g.save("graphs/capital")
"""

from resid.graphs.attribute import attribute, check_transcoders, logit_targets
from resid.graphs.graph import Graph
from resid.graphs.influence import prune

__all__ = ["Graph", "attribute", "check_transcoders", "logit_targets", "prune"]
