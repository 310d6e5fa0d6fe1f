"""Influence on the logits, and pruning by it, as circuit-tracer defines them.

A node's influence is the total (direct and indirect) weight of its paths to the logits
in the graph whose rows are normalised to absolute values summing to one, each logit
weighted by its probability: ``w @ (A + A² + ...)``. Pruning keeps the nodes carrying
``node_threshold`` of the total influence, then the edges carrying ``edge_threshold`` of
the total edge influence, then drops nodes left without outgoing (features, errors) or
incoming (features) edges, until nothing changes. Tokens and logits are always kept.

>>> node_mask, edge_mask, cumulative = prune(adjacency, probs, n_features, n_tokens)
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def normalise(matrix: Tensor) -> Tensor:
    """Rows as absolute values summing to one (zero rows stay zero)."""
    m = matrix.abs()
    return m / m.sum(1, keepdim=True).clamp(min=1e-10)


def influence(A: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    """``weights @ (A + A² + ...)`` for a nilpotent ``A`` (a graph without cycles).

    >>> influence(normalise(adjacency), logit_weights)
    """
    cur = weights @ A
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            return total
        cur = cur @ A
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


def partial_influences(
    rows: Tensor, probs: Tensor, row_node: Tensor, n_nodes: int, max_iter: int = 128
) -> Tensor:
    """The influence of every node on the logits from the rows computed so far
    (``rows[i]`` is node ``row_node[i]``'s incoming edges; logits are the last nodes).

    >>> infl = partial_influences(rows, probs, row_node, n_nodes)
    """
    A = normalise(rows)
    total = torch.zeros(rows.shape[1])
    prod = torch.zeros(n_nodes)
    prod[-len(probs) :] = probs
    for _ in range(max_iter):
        prod = prod[row_node] @ A
        if not prod.any():
            return total
        total += prod
        prod = torch.cat([prod, torch.zeros(n_nodes - len(prod))])
    raise RuntimeError("partial influence did not converge")


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    s = scores.sort(descending=True).values
    cum = s.cumsum(0) / s.sum()
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), len(s) - 1)
    return s[i]


def prune(
    adjacency: Float[Tensor, "n n"],
    probs: Float[Tensor, " n_logits"],
    n_features: int,
    n_tokens: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> tuple[Bool[Tensor, " n"], Bool[Tensor, "n n"], Float[Tensor, " n"]]:
    """(node mask, edge mask, each node's cumulative influence score), circuit-tracer's
    ``prune_graph``: see the module docstring.

    >>> nodes, edges, scores = prune(g.adjacency, g.logit_probabilities, n_feat, n_tok)
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, not {v}")
    n_logits = len(probs)
    w = torch.zeros(adjacency.shape[0])
    w[-n_logits:] = probs
    node_infl = influence(normalise(adjacency), w)
    nodes = node_infl >= _threshold(node_infl, node_threshold)
    nodes[-n_logits - n_tokens :] = True
    pruned = adjacency.clone()
    pruned[~nodes] = 0
    pruned[:, ~nodes] = 0
    A = normalise(pruned)
    edge_scores = A * (influence(A, w) + w)[:, None]
    edges = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
    inner = slice(0, adjacency.shape[0] - n_logits - n_tokens)
    old = nodes.clone()
    nodes[inner] &= edges[:, inner].any(0)
    nodes[:n_features] &= edges[:n_features].any(1)
    while not torch.equal(nodes, old):
        old = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[inner] &= edges[:, inner].any(0)
        nodes[:n_features] &= edges[:n_features].any(1)
    s, order = node_infl.sort(descending=True)
    cumulative = torch.zeros_like(node_infl)
    cumulative[order] = s.cumsum(0) / s.sum()
    return nodes, edges, cumulative
