"""GPT-Neo (``GPTNeoForCausalLM``): GPT-2's shape with separate q/k/v projections and no
q/k/v biases, unscaled attention, and local (windowed) attention on the layers its config
names.

>>> cfg = config({"hidden_size": 64, "num_layers": 2, "num_heads": 4,
...               "attention_layers": ["global", "local"]}, "config.json", held=2)
>>> cfg.attn_windows
(None, 256)
"""

from __future__ import annotations

from resid.core.config import Config
from resid.io.errors import CheckpointError
from resid.io.families import common


def config(hf: dict, where: str, held: int | None = None) -> Config:
    """resid's Config from a GPT-Neo ``config.json``."""
    d = common.positive_int(hf, "hidden_size", where, 2048)
    n_layers = common.layers(hf, "num_layers", where, held, 24)  # bounded before the list below
    n_heads = common.positive_int(hf, "num_heads", where, 16)
    kinds = hf.get("attention_layers")
    if kinds is None:
        kinds = ["global"] * n_layers
    if (
        not isinstance(kinds, list)
        or len(kinds) != n_layers
        or not all(k in ("global", "local") for k in kinds)
    ):
        raise CheckpointError(
            f"{where}: attention_layers must list 'global' or 'local' for each of {n_layers} layers"
        )
    window = common.positive_int(hf, "window_size", where, 256)
    inner = hf.get("intermediate_size")
    return common.make_config(
        where, n_layers=n_layers, n_heads=n_heads, d_model=d, d_head=common.head_width(d, n_heads, where),
        d_mlp=4 * d if inner is None else common.positive_int(hf, "intermediate_size", where),
        d_vocab=common.positive_int(hf, "vocab_size", where, 50257),
        n_ctx=common.positive_int(hf, "max_position_embeddings", where, 2048),
        layer_norm_eps=common.positive_float(hf, "layer_norm_epsilon", where, 1e-5),
        act_fn=common.activation(hf, "activation_function", where, "gelu_new"),
        attn_bias=False, attn_scale=1.0,
        attn_windows=tuple(window if k == "local" else None for k in kinds),
        architecture="gpt_neo",
    )  # fmt: skip


def params(cfg: Config) -> dict[str, common.Param]:
    """resid's parameters from GPT-Neo's tensors (``nn.Linear`` weights, transposed)."""
    out = common.outer_params(
        cfg, "wte.weight", ("ln_f.weight", "ln_f.bias"), None, pos="wpe.weight"
    )
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"h.{i}."
        a = h + "attn.attention."
        W, b = common.separate_qkv(
            cfg, (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), None
        )
        out |= {p + "attn.W_QKV": W, p + "attn.b_QKV": b}
        out |= common.out_params(cfg, p, a + "out_proj.weight", a + "out_proj.bias")
        out |= common.norm_params(
            cfg, p, (h + "ln_1.weight", h + "ln_1.bias"), (h + "ln_2.weight", h + "ln_2.bias")
        )
        out |= common.mlp_params(cfg, p, (h + "mlp.c_fc.weight", h + "mlp.c_fc.bias"),
                          (h + "mlp.c_proj.weight", h + "mlp.c_proj.bias"))  # fmt: skip
    return out


NEO = common.Family(
    "gpt_neo", "GPTNeoForCausalLM", ("transformer.",), "h", config, params, "wte.weight"
)
