"""The attribution graph of one prompt: direct linear effects through a local replacement
model, computed with batched backward passes on the model's own kernels.

The local replacement model is the model itself, run once on the prompt with hooks
(never a second copy): every attention pattern and every norm scale is detached (frozen
at the prompt's values: ``attn.hook_pattern``, ``ln1``/``ln2``/``ln_final.hook_scale``),
and each MLP's output is replaced by a constant (the transcoder's features, the error
term), so the residual stream is linear in its sources. The sources (nodes) are the
active transcoder features at every position but the first (circuit-tracer's
convention: the first token's features are outliers), one error node per layer and
position (``mlp_out - transcoder(x)``, zero at the first position), and the token
embeddings. The targets are the features' pre-activations and the logits of the top
tokens covering ``desired_logit_prob`` of the next-token probability (each as its
demeaned unembedding direction, as circuit-tracer does). An edge ``s -> t`` is what
``s``'s write vector (``W_dec[s]`` times its activation, an error vector, an
embedding) adds to ``t``'s read direction through the frozen model: one backward pass
per batch of targets, the gradient injected at their read sites, contracted with every
source's write vector where it enters the stream (the MLP's output, ``hook_embed``).
A skip transcoder's linear term is the one path through an MLP that carries gradient.

Node order (circuit-tracer's): features (by layer, position, index), errors (layer by
layer, position by position), tokens, logits. ``adjacency[t, s]`` is the edge s -> t.

>>> graph = resid.graphs.attribute(model, transcoders, "The capital of France is")
>>> graph.adjacency.shape               # [n_nodes, n_nodes]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from resid.core import names
from resid.core.protocols import ModelLike
from resid.graphs.graph import Graph
from resid.graphs.influence import partial_influences
from resid.sae.config import SAEError
from resid.sae.transcoder import Transcoder

MAX_BATCH = 1 << 14


def check_transcoders(model: ModelLike, transcoders: Sequence[Transcoder]) -> list[Transcoder]:
    """``transcoders`` as a list by layer, one per block of ``model``, each checked against
    it (sites, widths), or a clear :class:`SAEError`.

    >>> tcs = check_transcoders(model, resid.sae.load_transcoders("tcs/"))
    """
    tcs = list(transcoders)
    if not all(isinstance(t, Transcoder) for t in tcs):
        bad = next(type(t).__name__ for t in tcs if not isinstance(t, Transcoder))
        raise TypeError(f"attribute takes resid.sae.Transcoder objects, not {bad}")
    n = model.cfg.n_layers
    layers = [t.layer for t in tcs]
    if sorted(layers) != list(range(n)):
        raise SAEError(
            f"an attribution graph needs one transcoder per layer of {model!r} (0..{n - 1}); "
            f"got layers {layers}: these transcoders are for another model"
        )
    tcs.sort(key=lambda t: t.layer)
    for t in tcs:
        t.check_fits(model)
    return tcs


def _prompt_tokens(model: ModelLike, prompt) -> Int[Tensor, " pos"]:
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"a prompt is a string or one row of token ids, not {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )
    n = int(tokens.shape[0])
    if not 1 < n <= model.cfg.n_ctx:
        raise ValueError(
            f"the prompt is {n} tokens; an attribution graph needs 2 to n_ctx="
            f"{model.cfg.n_ctx} tokens for {model!r}: shorten it"
        )
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"token ids must be in [0, d_vocab={model.cfg.d_vocab})")
    return tokens.long().to(model.W_E.device)


def logit_targets(
    logits: Float[Tensor, " d_vocab"], W_U: Tensor, max_n_logits: int, desired_logit_prob: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(token ids, probabilities, demeaned unembedding columns ``[k, d_model]``) of the
    fewest top tokens whose probability reaches ``desired_logit_prob``, at most
    ``max_n_logits`` (circuit-tracer's choice).

    >>> ids, probs, vecs = logit_targets(logits[0, -1], model.W_U, 10, 0.95)
    """
    probs = torch.softmax(logits.float(), -1)
    top_p, top_i = probs.topk(min(max_n_logits, probs.shape[-1]))
    cut = int(torch.searchsorted(top_p.cumsum(0), top_p.new_tensor(desired_logit_prob))) + 1
    ids = top_i[:cut]
    W = W_U.float()
    return ids, probs[ids], (W[:, ids] - W.mean(1, keepdim=True)).T


def attribute(
    model: ModelLike,
    transcoders: Sequence[Transcoder],
    prompt: str | Sequence[int] | Tensor,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
) -> Graph:
    """The attribution graph of ``prompt`` through the local replacement model of
    ``model`` with ``transcoders`` (one per layer): see the module docstring.
    ``batch_size`` targets share a backward pass; ``max_feature_nodes`` keeps only the
    features of most influence on the logits (found as circuit-tracer does, by partial
    influence, ``update_interval`` batches at a time). Nothing stays attached afterwards.

    >>> g = resid.graphs.attribute(model, tcs, "When Mary and John went", max_n_logits=5)
    >>> g.prune().nodes[:3]
    """
    tcs = check_transcoders(model, transcoders)
    tokens = _prompt_tokens(model, prompt)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, not {type(batch_size).__name__}")
    if not 0 < batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH}, not {batch_size}")
    if not 0 < desired_logit_prob <= 1 or not 0 < max_n_logits <= model.cfg.d_vocab:
        raise ValueError("desired_logit_prob must be in (0, 1] and max_n_logits in 1..d_vocab")
    n_layers, n_pos = model.cfg.n_layers, int(tokens.shape[0])

    # 1. the real forward: every transcoder's input, every MLP's output, the logits
    sites = [t.hook_name for t in tcs] + [t.hook_name_out for t in tcs]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=sites)
        acts, recons = [], []
        for t in tcs:
            x = cache[t.hook_name][0]
            a = t.encode(x).float()
            a[0] = 0  # the first position's features are left out (circuit-tracer's convention)
            acts.append(a)
            recons.append(t.decode(a.to(t.W_dec.dtype), x).float())
        acts = torch.stack(acts)  # [layer, pos, d_sae]
        errors = torch.stack([cache[t.hook_name_out][0].float() for t in tcs]) - torch.stack(recons)
        errors[:, 0] = 0
    active = acts.nonzero()  # [n_active, 3]: layer, pos, feature (sorted)
    values = acts[active[:, 0], active[:, 1], active[:, 2]]
    # each active feature's read and write vectors, layer by layer (``active`` is sorted)
    per_layer = [active[active[:, 0] == t.layer, 2] for t in tcs]
    encoders = torch.cat(
        [t.W_enc.detach()[:, f].T.float() for t, f in zip(tcs, per_layer, strict=True)]
    )
    decoders = torch.cat([t.W_dec.detach()[f].float() for t, f in zip(tcs, per_layer, strict=True)])
    decoders = decoders * values[:, None]
    token_vecs = model.W_E[tokens].detach().float()
    ids, probs, logit_vecs = logit_targets(
        logits[0, -1], model.W_U.detach(), max_n_logits, desired_logit_prob
    )

    n_feat = len(active)
    logit_offset = n_feat + (n_layers + 1) * n_pos
    n_logits = len(ids)
    keep = n_feat if max_feature_nodes is None else max(0, min(int(max_feature_nodes), n_feat))

    run = _Backward(model, tcs, tokens, active, decoders, errors, token_vecs, batch_size)
    try:
        rows = torch.zeros(keep + n_logits, logit_offset)
        row_node = torch.zeros(keep + n_logits, dtype=torch.long)
        for i in range(0, n_logits, batch_size):
            vecs = logit_vecs[i : i + batch_size]
            k = len(vecs)
            rows[i : i + k] = run.rows(
                torch.full((k,), n_layers), torch.full((k,), n_pos - 1), vecs
            )
            row_node[i : i + k] = torch.arange(i, i + k) + logit_offset
        st, visited = n_logits, torch.zeros(n_feat, dtype=torch.bool)
        while int(visited.sum()) < keep:
            if keep == n_feat:
                pending = torch.arange(n_feat)
            else:
                infl = partial_influences(
                    rows[:st], probs.float().cpu(), row_node[:st], logit_offset + n_logits
                )
                rank = infl[:n_feat].argsort(descending=True)
                room = min(update_interval * batch_size, keep - int(visited.sum()))
                pending = rank[~visited[rank]][:room]
            for batch in pending.split(batch_size):
                k = len(batch)
                rows[st : st + k] = run.rows(active[batch, 0], active[batch, 1], encoders[batch])
                row_node[st : st + k] = batch
                visited[batch] = True
                st += k
    finally:
        run.close()

    selected = visited.nonzero()[:, 0]
    if keep < n_feat:  # only the chosen features as columns
        cols = torch.cat([selected, torch.arange(n_feat, logit_offset)])
        rows = rows[:, cols]
    rows = rows[row_node.argsort()]
    size = rows.shape[1] + n_logits
    adjacency = torch.zeros(size, size)
    adjacency[:keep] = torch.cat([rows[:keep], torch.zeros(keep, n_logits)], 1)
    adjacency[-n_logits:] = torch.cat([rows[keep:], torch.zeros(n_logits, n_logits)], 1)
    return Graph(
        tokens=tokens.cpu(),
        active_features=active[selected].cpu(),
        activations=values[selected].cpu(),
        logit_tokens=ids.cpu(),
        logit_probabilities=probs.cpu(),
        adjacency=adjacency,
        n_layers=n_layers,
        read_site=tcs[0].hook_name.split(".", 2)[2],
        model_name=getattr(model.cfg, "architecture", "model"),
        tokenizer=_tokenizer(model),
    )


def _tokenizer(model: ModelLike):
    try:
        return model.tokenizer
    except (ValueError, AttributeError):  # a model without one: nodes show token ids
        return None


class _Backward:
    """One hooked forward of ``batch_size`` copies of the prompt through the frozen model,
    kept for backward passes: ``rows(layers, positions, vectors)`` injects each vector as
    the gradient at its target's read site (row ``b`` of the batch) and returns each
    target's edges from every feature, error and token."""

    def __init__(self, model, tcs, tokens, active, decoders, errors, token_vecs, batch):
        self.n_layers, self.n_pos = len(tcs), int(tokens.shape[0])
        self.reads: list[Tensor | None] = [None] * (self.n_layers + 1)
        self.buffer: Tensor | None = None
        self.active, self.decoders, self.errors = active, decoders, errors
        self.token_vecs = token_vecs
        n_feat = len(active)
        self.error_offset = n_feat
        self.token_offset = n_feat + self.n_layers * self.n_pos
        self.row_size = n_feat + (self.n_layers + 1) * self.n_pos
        by_layer = [(active[:, 0] == i).nonzero()[:, 0] for i in range(self.n_layers)]
        self.by_layer = by_layer
        embed: dict[str, Tensor] = {}

        def leaf(x, hook):  # the embeddings: the leaf every path runs back to
            embed["x"] = x.detach().requires_grad_(True)
            return embed["x"]

        def freeze(x, hook):  # attention patterns and norm scales: constants for this prompt
            return x.detach()

        def read(x, hook, layer):
            self.reads[layer] = x

        def write(out, hook, layer):  # the MLP's output: a constant, but for the skip term
            t = tcs[layer]
            x = self.reads[layer]
            skip = t.skip(x).to(out.dtype) if t.cfg.skip else x[..., :1] * 0
            new = (out - skip).detach() + skip
            new.register_hook(lambda g, layer=layer: self._score(g, layer))
            return new

        cfg = model.cfg
        fwd = [("hook_embed", leaf), ("ln_final.hook_scale", freeze)]
        for i in range(cfg.n_layers):
            fwd += [(names.act_name("pattern", i), freeze)]
            fwd += [(names.act_name("scale", i, ln), freeze) for ln in ("ln1", "ln2")]
            fwd += [(tcs[i].hook_name, lambda x, hook, i=i: read(x, hook, i))]
            fwd += [(tcs[i].hook_name_out, lambda x, hook, i=i: write(x, hook, i))]
        self._hooks = model.hooks(fwd)
        self._hooks.__enter__()
        try:
            with torch.enable_grad():
                resid = model(tokens[None].expand(batch, -1), stop_at_layer=cfg.n_layers)
                self.reads[-1] = model.ln_final(resid)
        except BaseException:
            self.close()
            raise
        self.embed = embed["x"]

    def close(self) -> None:
        """Detach every hook (once)."""
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)

    def _score(self, grad: Tensor, layer: int) -> None:
        g = grad.float()
        idx = self.by_layer[layer]
        if len(idx):  # each feature's write vector against the gradient at its position
            pos = self.active[idx, 1]
            per_pos = g @ self.decoders[idx].T  # [batch, pos, n]: one GEMM
            self.buffer[:, idx] += per_pos[:, pos, torch.arange(len(idx), device=idx.device)]
        start = self.error_offset + layer * self.n_pos
        self.buffer[:, start : start + self.n_pos] += torch.einsum(
            "bpd,pd->bp", g, self.errors[layer]
        )

    def rows(self, layers: Tensor, positions: Tensor, vectors: Tensor) -> Tensor:
        k = len(layers)
        batch, device = self.embed.shape[0], self.embed.device
        layers, positions = layers.to(device), positions.to(device)
        vectors = vectors.to(device)
        self.buffer = torch.zeros(batch, self.row_size, device=device)
        handles = []
        b = torch.arange(k, device=device)
        for layer in layers.unique().tolist():
            m = layers == layer
            add = torch.zeros_like(self.reads[layer], dtype=torch.float32)
            add[b[m], positions[m]] = vectors[m].float()

            def inject(g, add=add):
                return g + add.to(g.dtype)

            handles.append(self.reads[layer].register_hook(inject))
        try:
            top = max(layers.unique().tolist())
            root = self.reads[top]
            (grad,) = torch.autograd.grad(
                root, self.embed, torch.zeros_like(root), retain_graph=True
            )
        finally:
            for h in handles:
                h.remove()
        self.buffer[:, self.token_offset :] += (grad.float() * self.token_vecs).sum(-1)
        out, self.buffer = self.buffer[:k].cpu(), None
        return out
