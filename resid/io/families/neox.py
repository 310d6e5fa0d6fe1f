"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): partial rotary, attention and MLP in
parallel, an untied unembedding (``embed_out``), and one fused q/k/v projection whose rows
are grouped per head as ``[q, k, v]`` (resid groups them ``[all q, all k, all v]``).

>>> cfg = config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
...               "rotary_pct": 0.25}, "config.json", held=2)
>>> cfg.rotary_dim
4
"""

from __future__ import annotations

from torch import Tensor

from resid.core.config import Config
from resid.io.families import common


def config(hf: dict, where: str, held: int | None = None) -> Config:
    """resid's Config from a GPT-NeoX ``config.json``."""
    d, n_heads = (
        common.positive_int(hf, "hidden_size", where, 6144),
        common.positive_int(hf, "num_attention_heads", where, 64),
    )
    d_head = common.head_width(d, n_heads, where)
    bias = common.flag(hf, "attention_bias", where, True)
    return common.make_config(
        where, n_layers=common.layers(hf, "num_hidden_layers", where, held, 44), n_heads=n_heads,
        d_model=d, d_head=d_head, d_mlp=common.positive_int(hf, "intermediate_size", where, 24576),
        d_vocab=common.positive_int(hf, "vocab_size", where, 50432),
        n_ctx=common.positive_int(hf, "max_position_embeddings", where, 2048),
        layer_norm_eps=common.positive_float(hf, "layer_norm_eps", where, 1e-5),
        act_fn=common.activation(hf, "hidden_act", where, "gelu"), positional="rotary",
        **common.rope(hf, where, d_head), attn_bias=bias, attn_out_bias=bias,
        parallel_attn_mlp=common.flag(hf, "use_parallel_residual", where, True),
        tie_embeddings=common.flag(hf, "tie_word_embeddings", where, False), architecture="gpt_neox",
    )  # fmt: skip


def _per_head_qkv(h: int, e: int):
    """Write NeoX's ``[(h, [q, k, v], e), d]`` rows as resid's ``[d, ([q, k, v], h, e)]``."""

    def write(out: Tensor, src: Tensor) -> None:
        if out.dim() == 1:
            out.view(3, h, e).copy_(src.view(h, 3, e).transpose(0, 1))
        else:
            out.view(-1, 3, h, e).copy_(src.view(h, 3, e, -1).permute(3, 1, 0, 2))

    return write


def params(cfg: Config) -> dict[str, common.Param]:
    """resid's parameters from GPT-NeoX's tensors."""
    d, h, e = cfg.d_model, cfg.n_heads, cfg.d_head
    out = common.outer_params(cfg, "embed_in.weight", ("final_layer_norm.weight", "final_layer_norm.bias"),
                       "embed_out.weight")  # fmt: skip
    regroup = _per_head_qkv(h, e)
    for i in range(cfg.n_layers):
        p, L = f"blocks.{i}.", f"layers.{i}."
        qkv = L + "attention.query_key_value."
        out[p + "attn.W_QKV"] = common.Param(
            (d, 3 * h * e), (common.Piece(qkv + "weight", (3 * h * e, d), regroup),)
        )
        out[p + "attn.b_QKV"] = common.Param((3 * h * e,), (common.Piece(qkv + "bias", (3 * h * e,), regroup),)
                                      if cfg.attn_bias else ())  # fmt: skip
        out |= common.out_params(cfg, p, L + "attention.dense.weight",
                          L + "attention.dense.bias" if cfg.attn_out_bias else None)  # fmt: skip
        out |= common.norm_params(cfg, p, (L + "input_layernorm.weight", L + "input_layernorm.bias"),
                           (L + "post_attention_layernorm.weight", L + "post_attention_layernorm.bias"))  # fmt: skip
        out |= common.mlp_params(cfg, p, (L + "mlp.dense_h_to_4h.weight", L + "mlp.dense_h_to_4h.bias"),
                          (L + "mlp.dense_4h_to_h.weight", L + "mlp.dense_4h_to_h.bias"))  # fmt: skip
    return out


NEOX = common.Family("gpt_neox", "GPTNeoXForCausalLM", ("gpt_neox.",), "layers", config, params,
              "embed_in.weight", tied="embed_out.weight",
                     renamed=(("lm_head.weight", "embed_out.weight"),))  # fmt: skip
