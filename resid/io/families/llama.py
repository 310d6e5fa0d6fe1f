"""Llama and its kin (``LlamaForCausalLM``, SmolLM; ``MistralForCausalLM``;
``Qwen2ForCausalLM``): RMSNorm, rotary (with Llama 3's scaling), grouped-query attention and
a SwiGLU MLP. Mistral adds a sliding window on every layer, Qwen2 q/k/v biases and a window
above ``max_window_layers``.

>>> cfg = config({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
...               "num_attention_heads": 9, "num_key_value_heads": 3}, "config.json", held=30)
>>> cfg.kv_heads
3
"""

from __future__ import annotations

from resid.core.config import Config
from resid.io.families import common


def config(hf: dict, where: str, held: int | None = None) -> Config:
    """resid's Config from a Llama, Mistral or Qwen2 ``config.json``."""
    family = hf.get("model_type", "llama")
    d = common.positive_int(hf, "hidden_size", where, 4096)
    n_layers = common.layers(hf, "num_hidden_layers", where, held, 32)  # bounded before any tuple
    n_heads = common.positive_int(hf, "num_attention_heads", where, 32)
    d_head = (
        common.positive_int(hf, "head_dim", where)
        if hf.get("head_dim")
        else common.head_width(d, n_heads, where)
    )
    windows = None
    if family == "mistral" and hf.get("sliding_window") is not None:
        windows = (common.positive_int(hf, "sliding_window", where),) * n_layers
    if family == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        first, window = (
            common.positive_int(hf, "max_window_layers", where, n_layers),
            common.positive_int(hf, "sliding_window", where),
        )
        windows = tuple(window if i >= first else None for i in range(n_layers))
    bias = common.flag(hf, "attention_bias", where, family == "qwen2")
    return common.make_config(
        where, n_layers=n_layers, n_heads=n_heads, d_model=d, d_head=d_head,
        d_mlp=common.positive_int(hf, "intermediate_size", where, 11008),
        d_vocab=common.positive_int(hf, "vocab_size", where, 32000),
        n_ctx=common.positive_int(hf, "max_position_embeddings", where, 2048),
        layer_norm_eps=common.positive_float(hf, "rms_norm_eps", where, 1e-6),
        act_fn=common.activation(hf, "hidden_act", where, "silu"), normalization="RMS", positional="rotary",
        **common.rope(hf, where, d_head), n_kv_heads=common.positive_int(hf, "num_key_value_heads", where, n_heads),
        attn_bias=bias, attn_out_bias=family != "qwen2" and bias,
        attn_windows=windows, gated_mlp=True, mlp_bias=common.flag(hf, "mlp_bias", where, False),
        tie_embeddings=common.flag(hf, "tie_word_embeddings", where, False), architecture=family,
    )  # fmt: skip


def params(cfg: Config) -> dict[str, common.Param]:
    """resid's parameters from a Llama-family checkpoint (``nn.Linear`` weights, transposed)."""
    out = common.outer_params(cfg, "embed_tokens.weight", ("norm.weight", None), "lm_head.weight")
    for i in range(cfg.n_layers):
        p, L = f"blocks.{i}.", f"layers.{i}."
        a, m = L + "self_attn.", L + "mlp."
        W, b = common.separate_qkv(
            cfg, (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") if cfg.attn_bias else None,
        )  # fmt: skip
        out |= {p + "attn.W_QKV": W, p + "attn.b_QKV": b}
        out |= common.out_params(
            cfg, p, a + "o_proj.weight", a + "o_proj.bias" if cfg.attn_out_bias else None
        )
        out |= common.norm_params(
            cfg, p, (L + "input_layernorm.weight", ""), (L + "post_attention_layernorm.weight", "")
        )
        up, down, gate = (m + k for k in ("up_proj.", "down_proj.", "gate_proj."))
        out |= common.mlp_params(cfg, p, (up + "weight", up + "bias" if cfg.mlp_bias else None),
                          (down + "weight", down + "bias" if cfg.mlp_bias else None),
                          gate=(gate + "weight", gate + "bias" if cfg.mlp_bias else None))  # fmt: skip
    return out


def _family(model_type: str, architecture: str) -> common.Family:
    return common.Family(
        model_type, architecture, ("model.",), "layers", config, params, "embed_tokens.weight"
    )


LLAMA = _family("llama", "LlamaForCausalLM")
MISTRAL = _family("mistral", "MistralForCausalLM")
QWEN2 = _family("qwen2", "Qwen2ForCausalLM")
