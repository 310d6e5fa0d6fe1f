"""An attribution graph: its nodes, its adjacency matrix, pruning, and the folder it is
saved as (circuit-tracer's frontend JSON, which its and Neuronpedia's viewers read).

Nodes, in order: ``n_features`` active features (``active_features[i] = (layer, pos,
feature)``, ``activations[i]``), ``n_layers * n_pos`` error nodes (layer-major), ``n_pos``
token embeddings, ``n_logits`` logits. ``adjacency[t, s]`` is the direct effect of node
``s`` on node ``t`` (a feature's pre-activation, a logit's demeaned value).

>>> g = resid.graphs.attribute(model, tcs, prompt)
>>> g.node(0)                          # {'kind': 'feature', 'layer': 1, 'pos': 3, ...}
>>> g.save("graphs/capital")           # graph.json, resid-manifest.json
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jaxtyping import Float, Int
from torch import Tensor

from resid.core import files
from resid.graphs.influence import prune

WRITER = "resid.graphs.Graph.save"
GRAPH_FILE = "graph.json"
SUPERNODES_FILE = "supernodes.json"


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


@dataclass
class Graph:
    """The attribution graph of one prompt (see the module docstring for the node order).

    >>> g.adjacency[g.logit_index(0)].topk(5)     # the strongest direct inputs of the top logit
    """

    tokens: Int[Tensor, " pos"]
    active_features: Int[Tensor, "n_features 3"]
    activations: Float[Tensor, " n_features"]
    logit_tokens: Int[Tensor, " n_logits"]
    logit_probabilities: Float[Tensor, " n_logits"]
    adjacency: Float[Tensor, "n_nodes n_nodes"]
    n_layers: int
    read_site: str = "ln2.hook_normalized"
    model_name: str = "model"
    tokenizer: object = field(default=None, repr=False)

    @property
    def n_pos(self) -> int:
        """The prompt's length."""
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        """How many feature nodes."""
        return len(self.active_features)

    @property
    def n_logits(self) -> int:
        """How many logit nodes."""
        return len(self.logit_tokens)

    @property
    def error_offset(self) -> int:
        """The first error node's index."""
        return self.n_features

    @property
    def token_offset(self) -> int:
        """The first token node's index."""
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_offset(self) -> int:
        """The first logit node's index."""
        return self.token_offset + self.n_pos

    def logit_index(self, i: int) -> int:
        """The node index of logit ``i`` (0: the most probable token)."""
        return self.logit_offset + i

    def _text(self, token: int) -> str:
        tok = self.tokenizer
        if tok is not None and hasattr(tok, "decode"):
            try:
                return tok.decode([int(token)])
            except Exception:  # a tokenizer that cannot show one id: show the id
                pass
        return f"<{int(token)}>"

    def node(self, i: int) -> dict:
        """Node ``i`` as a dict: ``kind`` (feature, error, token, logit), ``layer``,
        ``pos`` and, as they apply, ``feature``, ``activation``, ``token``, ``probability``.

        >>> g.node(g.logit_index(0))["token"]
        """
        if not 0 <= i < self.adjacency.shape[0]:
            raise IndexError(f"node {i} of {self.adjacency.shape[0]}")
        if i < self.n_features:
            layer, pos, feat = (int(v) for v in self.active_features[i])
            return {"kind": "feature", "layer": layer, "pos": pos, "feature": feat,
                    "activation": float(self.activations[i])}  # fmt: skip
        if i < self.token_offset:
            layer, pos = divmod(i - self.n_features, self.n_pos)
            return {"kind": "error", "layer": layer, "pos": pos}
        if i < self.logit_offset:
            pos = i - self.token_offset
            tok = int(self.tokens[pos])
            return {"kind": "token", "layer": -1, "pos": pos, "token": tok,
                    "text": self._text(tok)}  # fmt: skip
        k = i - self.logit_offset
        tok = int(self.logit_tokens[k])
        return {"kind": "logit", "layer": self.n_layers, "pos": self.n_pos - 1, "token": tok,
                "text": self._text(tok), "probability": float(self.logit_probabilities[k])}  # fmt: skip

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98):
        """(node mask, edge mask, cumulative influence per node): circuit-tracer's
        ``prune_graph`` (``resid.graphs.influence.prune``).

        >>> nodes, edges, scores = g.prune(0.8, 0.98)
        """
        return prune(self.adjacency, self.logit_probabilities, self.n_features, self.n_pos,
                     node_threshold, edge_threshold)  # fmt: skip

    def node_id(self, i: int) -> str:
        """circuit-tracer's ``node_id`` of node ``i`` (``{layer}_{feature}_{pos}``,
        ``0_{layer}_{pos}`` for errors, ``E_{token}_{pos}``, ``{n_layers+1}_{token}_{pos}``)."""
        n = self.node(i)
        if n["kind"] == "feature":
            return f"{n['layer']}_{n['feature']}_{n['pos']}"
        if n["kind"] == "error":
            return f"0_{n['layer']}_{n['pos']}"
        if n["kind"] == "token":
            return f"E_{n['token']}_{n['pos']}"
        return f"{self.n_layers + 1}_{n['token']}_{n['pos']}"

    def to_json(
        self, slug: str = "graph", node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> dict:
        """The pruned graph in circuit-tracer's frontend format (``metadata``, ``qParams``,
        ``nodes``, ``links``), which its local server and Neuronpedia's viewer read.

        >>> json.dumps(g.to_json("capital"))
        """
        nodes_mask, edge_mask, cumulative = self.prune(node_threshold, edge_threshold)
        kinds = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                 "token": "embedding", "logit": "logit"}  # fmt: skip
        nodes = {}
        for i in nodes_mask.nonzero()[:, 0].tolist():
            n = self.node(i)
            nid = self.node_id(i)
            entry = {"node_id": nid, "layer": str(n["layer"]), "ctx_idx": n["pos"],
                     "feature_type": kinds[n["kind"]], "influence": float(cumulative[i]),
                     "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                     "reverse_ctx_idx": 0, "clerp": "", "activation": None}  # fmt: skip
            if n["kind"] == "feature":
                entry |= {"feature": _cantor(n["layer"], n["feature"]),
                          "jsNodeId": f"{n['layer']}_{n['feature']}-0",
                          "activation": n["activation"]}  # fmt: skip
            elif n["kind"] == "error":
                entry |= {"feature": -1, "jsNodeId": f"{n['layer']}_{n['pos']}-0"}
            elif n["kind"] == "token":
                entry |= {"layer": "E", "feature": n["pos"], "jsNodeId": f"E_{n['token']}-{n['pos']}",
                          "clerp": n["text"]}  # fmt: skip
            else:
                p = n["probability"]
                entry |= {"layer": str(self.n_layers + 1), "feature": n["token"],
                          "jsNodeId": f"L_{n['token']}-{n['pos']}", "token_prob": p,
                          "is_target_logit": i == self.logit_offset, "influence": None,
                          "clerp": f'Output "{n["text"]}" (p={p:.3f})'}  # fmt: skip
            nodes[i] = entry
        dst, src = edge_mask.nonzero(as_tuple=True)
        links = [
            {"source": nodes[s]["node_id"], "target": nodes[d]["node_id"],
             "weight": float(self.adjacency[d, s])}
            for d, s in zip(dst.tolist(), src.tolist(), strict=True)
            if s in nodes and d in nodes
        ]  # fmt: skip
        used = {x for link in links for x in (link["source"], link["target"])}
        kept = [n for n in nodes.values()
                if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]  # fmt: skip
        return {
            "metadata": {
                "slug": slug, "scan": self.model_name, "transcoder_list": [],
                "prompt_tokens": [self._text(t) for t in self.tokens.tolist()],
                "prompt": "".join(self._text(t) for t in self.tokens.tolist()),
                "node_threshold": node_threshold, "schema_version": 1,
                "resid": {"read_site": self.read_site, "n_layers": self.n_layers},
            },
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                        "clickedId": "", "sg_pos": ""},
            "nodes": kept,
            "links": links,
        }  # fmt: skip

    def save(
        self,
        folder: str | Path,
        slug: str = "graph",
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
        supernodes: list[list[str]] | None = None,
        pages: dict[str, str | Callable[[dict], str]] | None = None,
    ) -> Path:
        """Write the pruned graph as ``folder/graph.json`` (circuit-tracer's frontend
        format; ``supernodes``, lists ``[name, node_id, ...]``, go in its ``qParams`` and
        in ``supernodes.json``; ``pages``, more text files by name (or functions of the
        graph's JSON that make them), e.g. ``index.html`` from ``resid.viz.graph_page``, are written beside them), whole or not at all, in a
        folder resid owns (an existing one is replaced only if empty or written here).

        >>> g.save("graphs/capital", supernodes=[["France", "3_12_4", "5_7_4"]])
        """
        data = self.to_json(slug, node_threshold, edge_threshold)
        pages = dict(pages or {})
        for name in pages:
            if (
                files.check_relpath(name, "a page name") != name
                or "/" in name
                or name in (GRAPH_FILE, SUPERNODES_FILE, files.MANIFEST)
            ):
                raise ValueError(f"a page is a plain file name other than graph.json, not {name!r}")
        groups = check_supernodes(supernodes or [], {n["node_id"] for n in data["nodes"]})
        data["qParams"]["supernodes"] = groups
        text = json.dumps(data, allow_nan=False)
        with files.replace_folder(folder, WRITER, "folder", durable=True) as tmp:
            (tmp / GRAPH_FILE).write_text(text, encoding="utf-8")
            (tmp / SUPERNODES_FILE).write_text(json.dumps(groups), encoding="utf-8")
            for name, text in pages.items():
                page = text(data) if callable(text) else text
                (tmp / name).write_text(page, encoding="utf-8")
        return files.target(folder)


def check_supernodes(groups: object, ids: set[str]) -> list[list[str]]:
    """``groups`` checked: a list of ``[name, node_id, ...]`` lists naming nodes in ``ids``.

    >>> check_supernodes([["say Paris", "3_12_4"]], {"3_12_4"})
    """
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and len(g) >= 2 and all(isinstance(s, str) for s in g) for g in groups
    ):
        raise ValueError("supernodes are a list of [name, node_id, node_id, ...] lists")
    unknown = sorted({s for g in groups for s in g[1:]} - ids)
    if unknown:
        raise ValueError(f"supernodes name nodes not in the pruned graph: {unknown[:8]}")
    return [list(g) for g in groups]
