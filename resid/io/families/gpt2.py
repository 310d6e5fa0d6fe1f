"""GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm, one fused q/k/v projection.

GPT-2's checkpoints store their ``Conv1D`` weights ``[in, out]``, which is already resid's
``x @ W`` layout: they are copied as they are. The unembedding is tied to the embedding; an
``lm_head.weight`` in the file must equal ``wte.weight``.

>>> cfg = config({"n_layer": 12, "n_head": 12, "n_embd": 768}, "config.json", held=12)
>>> params(cfg)["blocks.0.attn.W_QKV"].pieces[0].key
'h.0.attn.c_attn.weight'
"""

from __future__ import annotations

import warnings

from torch import Tensor

from resid.core.config import Config
from resid.io.errors import CheckpointError
from resid.io.families import common

GPT2_VOCAB = 50257  # GPT-2's tokenizer: ids 0-50255, then <|endoftext|> = 50256
# GPT-2's names for a block's weights -> resid's. Outside the blocks: wte, wpe, ln_f.
BLOCK_NAMES = {"ln_1.weight": "ln1.w", "ln_1.bias": "ln1.b", "ln_2.weight": "ln2.w", "ln_2.bias": "ln2.b",
               "attn.c_attn.weight": "attn.W_QKV", "attn.c_attn.bias": "attn.b_QKV",
               "attn.c_proj.weight": "attn.W_O", "attn.c_proj.bias": "attn.b_O",
               "mlp.c_fc.weight": "mlp.W_in", "mlp.c_fc.bias": "mlp.b_in",
               "mlp.c_proj.weight": "mlp.W_out", "mlp.c_proj.bias": "mlp.b_out"}  # fmt: skip
OUTER_NAMES = {"wte.weight": "W_E", "wpe.weight": "W_pos", "ln_f.weight": "ln_final.w",
               "ln_f.bias": "ln_final.b"}  # fmt: skip


def config(hf: dict, where: str, held: int | None = None) -> Config:
    """resid's Config from a Hugging Face GPT-2 ``config.json``, every value type- and
    range-checked (missing ones take GPT2Config's defaults, as transformers does)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise CheckpointError(
            f"{where}: activation {act!r} is not supported: resid's GPT-2 uses GELU"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError(
            f"{where}: this config scales attention differently from GPT-2, which resid does not"
        )
    d_model, n_heads = (
        common.positive_int(hf, "n_embd", where, 768),
        common.positive_int(hf, "n_head", where, 12),
    )
    n_inner = hf.get("n_inner")
    return common.make_config(
        where, n_layers=common.layers(hf, "n_layer", where, held, 12), n_heads=n_heads,
        d_model=d_model, d_head=common.head_width(d_model, n_heads, where),
        d_mlp=4 * d_model if n_inner is None else common.positive_int(hf, "n_inner", where),
        d_vocab=common.positive_int(hf, "vocab_size", where, GPT2_VOCAB),
        n_ctx=common.positive_int(hf, "n_positions", where, 1024),
        layer_norm_eps=common.positive_float(hf, "layer_norm_epsilon", where, 1e-5),
        act_fn=common.activation({"a": act}, "a", where, "gelu_new"),
    )  # fmt: skip


def guess_config(shapes: dict[str, tuple[int, ...]], held: int, where: str) -> Config:
    """The shapes of a bare GPT-2 weight file with no config.json beside it (GPT-2's
    64-dimensional heads assumed, with a warning)."""
    wte, wpe = shapes.get("wte.weight"), shapes.get("wpe.weight")
    if wte is None or wpe is None or len(wte) != 2 or len(wpe) != 2:
        raise CheckpointError(
            "these weights are not a GPT-2 state dict: no 2-D 'wte.weight' / 'wpe.weight' "
            f"(keys start {sorted(shapes)[:6]})"
        )
    (d_vocab, d_model), n_ctx = wte, wpe[0]
    fc = shapes.get("h.0.mlp.c_fc.weight")
    d_mlp = fc[-1] if fc is not None and len(fc) == 2 else 4 * d_model
    if d_model < 64 or d_model % 64:
        raise CheckpointError(
            f"{where}: the width {d_model} is not a multiple of GPT-2's 64-dimensional heads; "
            "pass config=resid.Config(...) with the right n_heads and d_head"
        )
    warnings.warn(
        "no config.json beside the weights: assuming GPT-2's 64-dimensional heads "
        f"(n_heads={d_model // 64}). Pass config=resid.Config(...) if that is wrong.",
        stacklevel=5,
    )
    return common.make_config(where, n_layers=max(held, 1), n_heads=d_model // 64, d_model=d_model,
                       d_head=64, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx)  # fmt: skip


def params(cfg: Config) -> dict[str, common.Param]:
    """resid's parameters from GPT-2's tensors: every ``Conv1D`` weight as it is stored."""
    d, m = cfg.d_model, cfg.d_mlp
    out = common.outer_params(
        cfg, "wte.weight", ("ln_f.weight", "ln_f.bias"), None, pos="wpe.weight"
    )
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"h.{i}."
        out |= common.norm_params(cfg, p, (h + "ln_1.weight", h + "ln_1.bias"),
                           (h + "ln_2.weight", h + "ln_2.bias"))  # fmt: skip
        shapes = {"attn.c_attn.weight": (d, 3 * d), "attn.c_proj.weight": (d, d),
                  "mlp.c_fc.weight": (d, m), "mlp.c_proj.weight": (m, d)}  # fmt: skip
        for src, shape in shapes.items():
            dst = BLOCK_NAMES[src]
            out[p + dst] = common.Param((cfg.n_heads, cfg.d_head, d) if dst == "attn.W_O" else shape,
                                 (common.Piece(h + src, shape),))  # fmt: skip
            bias = src.replace(".weight", ".bias")
            out[p + BLOCK_NAMES[bias]] = common.vector(shape[1], h + bias)
    return out


def to_gpt2_state_dict(model) -> dict[str, Tensor]:
    """The model's weights under GPT-2's names and ``Conv1D`` layout (what HF's GPT2Model
    loads).

    >>> to_gpt2_state_dict(model)["h.0.attn.c_attn.weight"].shape    # [d_model, 3·d_model]
    """
    params = dict(model.named_parameters())
    out = {src: params[dst] for src, dst in OUTER_NAMES.items()}
    for i in range(model.cfg.n_layers):
        for src, dst in BLOCK_NAMES.items():
            out[f"h.{i}.{src}"] = params[f"blocks.{i}.{dst}"]
        out[f"h.{i}.attn.c_proj.weight"] = out[f"h.{i}.attn.c_proj.weight"].flatten(0, 1)
    return {k: v.detach() for k, v in out.items()}


def gpt2_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every weight of a GPT-2 checkpoint, by its GPT-2 name, with its ``[in, out]`` shape."""
    return {piece.key: piece.shape for p in params(cfg).values() for piece in p.pieces}


GPT2 = common.Family(
    "gpt2", "GPT2LMHeadModel", ("transformer.",), "h", config, params, "wte.weight"
)
