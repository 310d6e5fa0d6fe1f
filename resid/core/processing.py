"""Explicit weight processing, as TransformerLens applies it at load time: a NEW model.

resid keeps a checkpoint's exact weights; ``process_weights`` returns a copy whose weights
are rewritten so that the function is unchanged but the basis is TransformerLens'
(``HookedTransformer.from_pretrained``'s defaults), e.g. to splice an SAE trained on
TransformerLens' processed GPT-2. Each step, with ``x̂`` the normalised stream:

- ``fold_ln``: a norm's gain ``w`` (and LayerNorm's bias ``b``) move into the weights that
  read it, ``x̂ w + b -> x̂`` with ``W -> diag(w) W`` and ``b_W -> b_W + b W`` (Q, K, V,
  the MLP's input and gate, the unembedding). With LayerNorm the reading weights are then
  centred over ``d_model`` (``x̂`` has zero mean, so the mean row reads nothing). The norms
  become ``LNPre`` / ``RMSPre``: they only normalise.
- ``center_writing_weights`` (LayerNorm only): every vector written to the stream (``W_E``,
  ``W_pos``, ``W_O``, ``b_O``, ``W_out``, ``b_out``) loses its mean over ``d_model``. Every
  reader subtracts the mean first, so nothing downstream changes.
- ``center_unembed``: ``W_U`` and ``b_U`` lose their mean over the vocabulary: each
  logit row shifts by a constant, log-probabilities are unchanged.
- ``fold_value_biases``: since a pattern row sums to 1, ``b_V`` adds the constant
  ``Σ_h b_V[h] W_O[h]``: it moves into ``b_O``.
- ``refactor_factored_attn_matrices``: each head's ``[W_Q; b_Q] [W_K; b_K]ᵀ`` and
  ``[W_V; b_V] W_O`` re-factored evenly through their SVD (learned positions only).

The processed model records its steps in ``cfg.processing`` (and its norms in
``cfg.normalization``); the loaded model is never changed.

>>> tl_basis = resid.process_weights(model)            # TransformerLens' defaults
>>> tl_basis.cfg.processing
('fold_ln', 'center_writing_weights', 'center_unembed', 'fold_value_biases')
>>> (tl_basis(tokens).log_softmax(-1) - model(tokens).log_softmax(-1)).abs().max()  # ~1e-6
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from resid.core.factored import FactoredMatrix
from resid.core.layers import LNPre, RMSPre
from resid.core.model import Model

STEPS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)
State = dict[str, Tensor]


@torch.no_grad()
def process_weights(
    model: Model,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> Model:
    """A new model computing the same log-probabilities with TransformerLens' processed
    weights (its ``process_weights`` options and defaults); ``model`` is left unchanged.

    Logits change only by a constant per position (``center_unembed``). Steps already
    applied to ``model`` (``model.cfg.processing``) are not applied twice.
    ``center_writing_weights`` needs LayerNorm: on an RMSNorm model it is skipped with a
    warning, as TransformerLens skips it. ``refactor_factored_attn_matrices`` is refused
    for rotary models (QK depends on position) and grouped-query attention.

    >>> processed = resid.process_weights(model)
    >>> processed.cfg.normalization, processed.cfg.processing     # 'LNPre', (...4 steps)
    >>> exact_ov = resid.process_weights(model, center_unembed=False, fold_value_biases=False)
    """
    if not isinstance(model, Model):
        raise TypeError(f"process_weights takes a resid.Model, not {type(model).__name__}")
    cfg = model.cfg
    done = set(cfg.processing)
    layer_norm = cfg.normalization in ("LN", "LNPre")
    if center_writing_weights and not layer_norm:
        warnings.warn(
            f"center_writing_weights needs LayerNorm (it relies on every reader removing the "
            f"mean); this model's norm is {cfg.normalization}, so its writing weights are left "
            "as they are (TransformerLens skips it too). Pass center_writing_weights=False to "
            "silence this.",
            stacklevel=3,  # past torch.no_grad's wrapper, to the caller
        )
        center_writing_weights = False
    if refactor_factored_attn_matrices:
        if cfg.positional == "rotary":
            raise ValueError(
                "refactor_factored_attn_matrices needs learned positions: a rotary model's QK "
                "circuit depends on the query-key distance, so W_Q and W_K cannot be re-factored"
            )
        if cfg.kv_heads != cfg.n_heads:
            raise ValueError(
                "refactor_factored_attn_matrices re-factors each head's W_Q W_Kᵀ; with "
                "grouped-query attention heads share W_K, so it cannot be done per head"
            )
    wanted = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
        "refactor_factored_attn_matrices": refactor_factored_attn_matrices,
    }
    todo = [s for s in STEPS if wanted[s] and s not in done]
    state = {k: v.detach().to(torch.float64, copy=True) for k, v in model.state_dict().items()}
    state.setdefault("lm_head", state["W_E"].T.clone())  # W_U, untied from here on
    state.setdefault("b_U", state["W_E"].new_zeros(cfg.d_vocab))
    normalization = cfg.normalization
    if "fold_ln" in todo:
        _fold_norms(state, cfg)
        normalization = {"LN": "LNPre", "RMS": "RMSPre"}.get(normalization, normalization)
    if "center_writing_weights" in todo:
        _center_writing(state, cfg)
    if "center_unembed" in todo:
        state["lm_head"] -= state["lm_head"].mean(-1, keepdim=True)
        state["b_U"] -= state["b_U"].mean()
    if "fold_value_biases" in todo:
        _fold_value_biases(
            state, cfg, recentre=layer_norm and "center_writing_weights" in done | set(todo)
        )
    if "refactor_factored_attn_matrices" in todo:
        _refactor(state, cfg)
    new_cfg = dataclasses.replace(
        cfg,
        normalization=normalization,
        tie_embeddings=False,
        unembed_bias=True,
        attn_bias=cfg.attn_bias or "fold_ln" in todo or "refactor_factored_attn_matrices" in todo,
        processing=tuple(s for s in STEPS if s in done or s in todo),
    )
    return _build(model, new_cfg, state)


def _fold_norms(state: State, cfg) -> None:
    """Fold every norm's gain (and LayerNorm's bias) into the weights that read it; with
    LayerNorm, centre those reading weights over d_model."""
    layer_norm = cfg.normalization == "LN"
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        _fold_into(state, p + "ln1", [(p + "attn.W_QKV", p + "attn.b_QKV")], layer_norm)
        mlp = [(p + "mlp.W_in", p + "mlp.b_in")]
        gate = [(p + "mlp.W_gate", p + "mlp.b_gate")] if p + "mlp.W_gate" in state else []
        _fold_into(state, p + "ln2", mlp + gate, layer_norm, centre=[p + "mlp.W_in"])
    _fold_into(state, "ln_final", [("lm_head", "b_U")], layer_norm)


def _fold_into(
    state: State,
    norm: str,
    readers: list[tuple[str, str]],
    layer_norm: bool,
    centre: list[str] | None = None,
) -> None:
    """``x̂ w + b`` read by ``x @ W + c``  ->  ``x̂ @ (diag(w) W) + (c + b W)``. TransformerLens
    centres Q, K, V, W_in and W_U after folding a LayerNorm (not W_gate): ``centre``
    names the readers to centre, default all."""
    if norm + ".w" not in state:  # already a Pre norm
        return
    w = state.pop(norm + ".w")
    b = state.pop(norm + ".b", None)
    for W_name, b_name in readers:
        W = state[W_name]
        if layer_norm and b is not None:
            state[b_name] = state[b_name] + b @ W
        W = W * w[:, None]
        if layer_norm and (centre is None or W_name in centre):
            W = W - W.mean(0, keepdim=True)
        state[W_name] = W


def _center_writing(state: State, cfg) -> None:
    """Every vector written to the residual stream, minus its mean over d_model."""
    names = ["W_E", "W_pos"]
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        names += [p + "attn.W_O", p + "attn.b_O", p + "mlp.W_out", p + "mlp.b_out"]
    for name in names:
        if name in state:
            state[name] = state[name] - state[name].mean(-1, keepdim=True)


def _qkv(state: State, cfg, layer: int) -> tuple[Tensor, ...]:
    """Layer ``layer``'s W_Q, W_K, W_V ``[heads, d_model, d_head]`` and b_Q, b_K, b_V
    ``[heads, d_head]``, split out of the fused ``W_QKV`` / ``b_QKV``."""
    p = f"blocks.{layer}.attn."
    h, kv, e = cfg.n_heads, cfg.kv_heads, cfg.d_head
    Ws = state[p + "W_QKV"].split((h * e, kv * e, kv * e), dim=-1)
    bs = state[p + "b_QKV"].split((h * e, kv * e, kv * e), dim=-1)
    W = [w.unflatten(-1, (-1, e)).transpose(0, 1) for w in Ws]  # [heads, d_model, d_head]
    b = [x.unflatten(-1, (-1, e)) for x in bs]
    return (*W, *b)


def _set_qkv(state: State, cfg, layer: int, W_Q, W_K, W_V, b_Q, b_K, b_V) -> None:
    p = f"blocks.{layer}.attn."
    state[p + "W_QKV"] = torch.cat([w.transpose(0, 1).flatten(-2) for w in (W_Q, W_K, W_V)], -1)
    state[p + "b_QKV"] = torch.cat([b.flatten(-2) for b in (b_Q, b_K, b_V)], -1)


def _fold_value_biases(state: State, cfg, recentre: bool) -> None:
    """``b_O += Σ_h b_V[kv(h)] W_O[h]``, ``b_V = 0`` (each query head reads the value bias
    of its key/value head); TransformerLens then re-centres ``b_O`` if writing weights are
    centred."""
    group = cfg.n_heads // cfg.kv_heads
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}.attn."
        W_Q, W_K, W_V, b_Q, b_K, b_V = _qkv(state, cfg, layer)
        per_head = b_V.repeat_interleave(group, 0)  # [n_heads, d_head]
        b_O = state[p + "b_O"] + torch.einsum("he,hed->d", per_head, state[p + "W_O"])
        state[p + "b_O"] = b_O - b_O.mean() if recentre else b_O
        _set_qkv(state, cfg, layer, W_Q, W_K, W_V, b_Q, b_K, torch.zeros_like(b_V))


def _refactor(state: State, cfg) -> None:
    """Each head's QK ``[W_Q; b_Q][W_K; b_K]ᵀ`` as its even SVD factorisation (both factors
    ``U √S``, ``V √S``); the value bias folded into ``b_O``, then OV ``W_V W_O`` as
    ``W_V = U S``, ``W_O = Vᵀ`` -- TransformerLens' choices."""
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}.attn."
        W_Q, W_K, W_V, b_Q, b_K, b_V = _qkv(state, cfg, layer)
        Q = torch.cat([W_Q, b_Q[:, None]], 1)  # [head, d_model + 1, d_head]
        K = torch.cat([W_K, b_K[:, None]], 1)
        Q, Kt = FactoredMatrix(Q, K.mT).make_even().pair
        K = Kt.mT
        W_O = state[p + "W_O"]
        state[p + "b_O"] = state[p + "b_O"] + torch.einsum("he,hed->d", b_V, W_O)
        U, S, V = FactoredMatrix(W_V, W_O).svd()
        state[p + "W_O"] = V.mT
        W_V = U * S[..., None, :]
        _set_qkv(state, cfg, layer, Q[:, :-1], K[:, :-1], W_V, Q[:, -1], K[:, -1], 0 * b_V)


def _build(model: Model, cfg, state: State) -> Model:
    """A ``Model`` of ``cfg`` holding ``state``, on ``model``'s device and in its dtype."""
    with torch.device("meta"):
        new = Model(cfg, tokenizer=model._tokenizer)
    new.load_state_dict({k: v.to(model.dtype).contiguous() for k, v in state.items()}, assign=True)
    for module in new.modules():  # the Pre norms' constant gains, made on meta above
        if isinstance(module, (LNPre, RMSPre)):
            module.w = torch.ones(cfg.d_model)
            if isinstance(module, LNPre):
                module.b = torch.zeros(cfg.d_model)
    new.padding_side = model.padding_side
    return new.to(device=model.device, dtype=model.dtype).eval()
