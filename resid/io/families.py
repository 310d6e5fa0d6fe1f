"""Model families beyond GPT-2: each Hugging Face architecture's config read into resid's
``Config``, and its weights renamed (and transposed to ``x @ W``) into resid's parameters.

| family | ``architectures`` | what differs from GPT-2 |
|---|---|---|
| GPT-Neo | ``GPTNeoForCausalLM`` | no q/k/v biases, unscaled attention, alternating local attention |
| Pythia | ``GPTNeoXForCausalLM`` | partial rotary, parallel attention + MLP, untied unembedding |
| Llama, SmolLM | ``LlamaForCausalLM`` | RMSNorm, rotary (Llama 3 scaling), grouped-query attention, SwiGLU |
| Mistral | ``MistralForCausalLM`` | as Llama, with a sliding window |
| Qwen2 | ``Qwen2ForCausalLM`` | as Llama, with q/k/v biases |

Every tensor's shape is checked against the config before anything is built; a missing,
unexpected or mis-shaped key raises ``CheckpointError`` naming it.

>>> cfg = config_from_hf(json.load(open("config.json")))
>>> state = to_resid(weights, cfg)        # resid parameter name -> tensor
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

from resid.core.config import Config
from resid.io.errors import CheckpointError

SUPPORTED = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_ACTS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new",
         "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}  # fmt: skip


def supported() -> str:
    return ", ".join(f"{arch} ({t})" for t, arch in SUPPORTED.items())


def family_of(hf: dict, where: str) -> str:
    """The ``model_type`` of a Hugging Face config, if resid supports it."""
    model_type = hf.get("model_type", "gpt2")
    if model_type not in SUPPORTED:
        archs = hf.get("architectures")
        raise CheckpointError(
            f"{where}: {archs or model_type!r} is not an architecture resid supports; it reads "
            f"{supported()}"
        )
    return model_type


# ---- checked config values ---------------------------------------------------------------


def _int(hf: dict, key: str, where: str, default: int | None = None) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer, not {value!r}")
    return int(value)


def _float(hf: dict, key: str, where: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {key} must be a finite number, not {value!r}")
    if value <= 0:
        raise CheckpointError(f"{where}: {key} must be positive, not {value!r}")
    return float(value)


def _act(hf: dict, key: str, where: str, default: str) -> str:
    act = hf.get(key, default)
    if act not in _ACTS:
        raise CheckpointError(
            f"{where}: activation {act!r} is not one resid has ({', '.join(_ACTS)})"
        )
    return _ACTS[act]


def _rope(hf: dict, where: str, default_theta: float = 10000.0) -> dict:
    """θ, the rotated fraction and Llama 3 scaling, from old (``rope_theta``,
    ``rope_scaling``, ``rotary_pct``) or new (``rope_parameters``) config keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: rope_parameters / rope_scaling must be objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
    fraction = merged.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not 0 < fraction <= 1
    ):
        raise CheckpointError(f"{where}: the rotary fraction must be in (0, 1], not {fraction!r}")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(
            f"{where}: rotary scaling {kind!r} is not supported (resid has none and 'llama3')"
        )
    out = {
        "rotary_base": _float({"θ": theta}, "θ", where, default_theta),
        "fraction": float(fraction),
    }
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in merged for k in keys):
            raise CheckpointError(f"{where}: llama3 rotary scaling needs {', '.join(keys)}")
        out["rotary_scaling"] = tuple(merged[k] for k in keys)
    return out


def _config(where: str, **fields) -> Config:
    try:
        return Config(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _rotary_dim(d_head: int, fraction: float) -> int:
    return int(d_head * fraction)


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    """resid's ``Config`` for a non-GPT-2 Hugging Face config (GPT-2's is read by
    ``resid.io.loading``)."""
    family = family_of(hf, where)
    if family == "gpt2":
        raise CheckpointError(f"{where}: GPT-2 configs are read by resid.io.loading")
    return _CONFIGS[family](hf, where)


def _gpt_neo(hf: dict, where: str) -> Config:
    d = _int(hf, "hidden_size", where, 2048)
    n_layers = _int(hf, "num_layers", where, 24)
    n_heads = _int(hf, "num_heads", where, 16)
    types = hf.get("attention_layers")
    if types is None:
        types = ["global"] * n_layers
    if not isinstance(types, list) or len(types) != n_layers or set(types) - {"global", "local"}:
        raise CheckpointError(
            f"{where}: attention_layers must list 'global' or 'local' for each of {n_layers} layers"
        )
    window = _int(hf, "window_size", where, 256)
    inner = hf.get("intermediate_size")
    return _config(
        where, n_layers=n_layers, n_heads=n_heads, d_model=d, d_head=d // n_heads,
        d_mlp=4 * d if inner is None else _int(hf, "intermediate_size", where),
        d_vocab=_int(hf, "vocab_size", where, 50257),
        n_ctx=_int(hf, "max_position_embeddings", where, 2048),
        layer_norm_eps=_float(hf, "layer_norm_epsilon", where, 1e-5),
        act_fn=_act(hf, "activation_function", where, "gelu_new"),
        attn_bias=False, attn_scale=1.0,
        attn_windows=tuple(window if t == "local" else None for t in types),
        architecture="gpt_neo",
    )  # fmt: skip


def _gpt_neox(hf: dict, where: str) -> Config:
    d = _int(hf, "hidden_size", where, 6144)
    n_heads = _int(hf, "num_attention_heads", where, 64)
    rope = _rope(hf, where)
    d_head = d // n_heads
    return _config(
        where, n_layers=_int(hf, "num_hidden_layers", where, 44), n_heads=n_heads,
        d_model=d, d_head=d_head, d_mlp=_int(hf, "intermediate_size", where, 24576),
        d_vocab=_int(hf, "vocab_size", where, 50432),
        n_ctx=_int(hf, "max_position_embeddings", where, 2048),
        layer_norm_eps=_float(hf, "layer_norm_eps", where, 1e-5),
        act_fn=_act(hf, "hidden_act", where, "gelu"), positional="rotary",
        rotary_dim=_rotary_dim(d_head, rope["fraction"]), rotary_base=rope["rotary_base"],
        attn_bias=bool(hf.get("attention_bias", True)), attn_out_bias=bool(hf.get("attention_bias", True)),
        parallel_attn_mlp=bool(hf.get("use_parallel_residual", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), architecture="gpt_neox",
    )  # fmt: skip


def _llama_like(hf: dict, where: str) -> Config:
    family = hf.get("model_type", "llama")
    d = _int(hf, "hidden_size", where, 4096)
    n_layers = _int(hf, "num_hidden_layers", where, 32)
    n_heads = _int(hf, "num_attention_heads", where, 32)
    d_head = _int(hf, "head_dim", where, d // n_heads) if hf.get("head_dim") else d // n_heads
    rope = _rope(hf, where)
    windows = None
    sliding = hf.get("sliding_window")
    if family == "mistral" and sliding is not None:
        windows = (_int(hf, "sliding_window", where),) * n_layers
    if family == "qwen2" and hf.get("use_sliding_window") and sliding is not None:
        first = _int(hf, "max_window_layers", where, n_layers)
        windows = tuple(
            _int(hf, "sliding_window", where) if i >= first else None for i in range(n_layers)
        )
    bias = bool(hf.get("attention_bias", family == "qwen2"))
    return _config(
        where, n_layers=n_layers, n_heads=n_heads, d_model=d, d_head=d_head,
        d_mlp=_int(hf, "intermediate_size", where, 11008),
        d_vocab=_int(hf, "vocab_size", where, 32000),
        n_ctx=_int(hf, "max_position_embeddings", where, 2048),
        layer_norm_eps=_float(hf, "rms_norm_eps", where, 1e-6),
        act_fn=_act(hf, "hidden_act", where, "silu"), normalization="RMS", positional="rotary",
        rotary_dim=_rotary_dim(d_head, rope["fraction"]), rotary_base=rope["rotary_base"],
        rotary_scaling=rope.get("rotary_scaling"),
        n_kv_heads=_int(hf, "num_key_value_heads", where, n_heads),
        attn_bias=bias, attn_out_bias=family != "qwen2" and bias,
        attn_windows=windows, gated_mlp=True, mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), architecture=family,
    )  # fmt: skip


_CONFIGS: dict[str, Callable[[dict, str], Config]] = {
    "gpt_neo": _gpt_neo,
    "gpt_neox": _gpt_neox,
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
}


# ---- weights -----------------------------------------------------------------------------


def _linear(w: Tensor) -> Tensor:
    """An ``nn.Linear`` weight ``[out, in]`` as resid's ``x @ W`` matrix ``[in, out]``."""
    return w.T


def _names(cfg: Config) -> dict[str, str]:
    """resid parameter -> the checkpoint tensor it comes from, for ``cfg``'s family (keys
    with the model prefix ``transformer.``/``gpt_neox.``/``model.`` removed)."""
    L = range(cfg.n_layers)
    fam = cfg.architecture
    if fam == "gpt_neo":
        names = {"W_E": "wte.weight", "W_pos": "wpe.weight", "ln_final.w": "ln_f.weight",
                 "ln_final.b": "ln_f.bias"}  # fmt: skip
        for i in L:
            p = f"h.{i}."
            names |= {
                f"blocks.{i}.ln1.w": p + "ln_1.weight", f"blocks.{i}.ln1.b": p + "ln_1.bias",
                f"blocks.{i}.ln2.w": p + "ln_2.weight", f"blocks.{i}.ln2.b": p + "ln_2.bias",
                f"blocks.{i}.attn.q": p + "attn.attention.q_proj.weight",
                f"blocks.{i}.attn.k": p + "attn.attention.k_proj.weight",
                f"blocks.{i}.attn.v": p + "attn.attention.v_proj.weight",
                f"blocks.{i}.attn.W_O": p + "attn.attention.out_proj.weight",
                f"blocks.{i}.attn.b_O": p + "attn.attention.out_proj.bias",
                f"blocks.{i}.mlp.W_in": p + "mlp.c_fc.weight", f"blocks.{i}.mlp.b_in": p + "mlp.c_fc.bias",
                f"blocks.{i}.mlp.W_out": p + "mlp.c_proj.weight",
                f"blocks.{i}.mlp.b_out": p + "mlp.c_proj.bias",
            }  # fmt: skip
        return names
    if fam == "gpt_neox":
        names = {"W_E": "embed_in.weight", "ln_final.w": "final_layer_norm.weight",
                 "ln_final.b": "final_layer_norm.bias", "lm_head": "embed_out.weight"}  # fmt: skip
        for i in L:
            p = f"layers.{i}."
            names |= {
                f"blocks.{i}.ln1.w": p + "input_layernorm.weight",
                f"blocks.{i}.ln1.b": p + "input_layernorm.bias",
                f"blocks.{i}.ln2.w": p + "post_attention_layernorm.weight",
                f"blocks.{i}.ln2.b": p + "post_attention_layernorm.bias",
                f"blocks.{i}.attn.qkv": p + "attention.query_key_value.weight",
                f"blocks.{i}.attn.qkv_bias": p + "attention.query_key_value.bias",
                f"blocks.{i}.attn.W_O": p + "attention.dense.weight",
                f"blocks.{i}.attn.b_O": p + "attention.dense.bias",
                f"blocks.{i}.mlp.W_in": p + "mlp.dense_h_to_4h.weight",
                f"blocks.{i}.mlp.b_in": p + "mlp.dense_h_to_4h.bias",
                f"blocks.{i}.mlp.W_out": p + "mlp.dense_4h_to_h.weight",
                f"blocks.{i}.mlp.b_out": p + "mlp.dense_4h_to_h.bias",
            }  # fmt: skip
        return names
    names = {"W_E": "embed_tokens.weight", "ln_final.w": "norm.weight", "lm_head": "lm_head.weight"}
    for i in L:
        p = f"layers.{i}."
        names |= {
            f"blocks.{i}.ln1.w": p + "input_layernorm.weight",
            f"blocks.{i}.ln2.w": p + "post_attention_layernorm.weight",
            f"blocks.{i}.attn.q": p + "self_attn.q_proj.weight",
            f"blocks.{i}.attn.k": p + "self_attn.k_proj.weight",
            f"blocks.{i}.attn.v": p + "self_attn.v_proj.weight",
            f"blocks.{i}.attn.W_O": p + "self_attn.o_proj.weight",
            f"blocks.{i}.mlp.W_gate": p + "mlp.gate_proj.weight",
            f"blocks.{i}.mlp.W_in": p + "mlp.up_proj.weight",
            f"blocks.{i}.mlp.W_out": p + "mlp.down_proj.weight",
        }
        if cfg.attn_bias:
            names |= {f"blocks.{i}.attn.q_bias": p + "self_attn.q_proj.bias",
                      f"blocks.{i}.attn.k_bias": p + "self_attn.k_proj.bias",
                      f"blocks.{i}.attn.v_bias": p + "self_attn.v_proj.bias"}  # fmt: skip
        if cfg.attn_out_bias:
            names[f"blocks.{i}.attn.b_O"] = p + "self_attn.o_proj.bias"
        if cfg.mlp_bias:
            names |= {f"blocks.{i}.mlp.b_gate": p + "mlp.gate_proj.bias",
                      f"blocks.{i}.mlp.b_in": p + "mlp.up_proj.bias",
                      f"blocks.{i}.mlp.b_out": p + "mlp.down_proj.bias"}  # fmt: skip
    return names


def _shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The checkpoint shape (``nn.Linear``'s ``[out, in]``) of each name in ``_names``."""
    d, m, V, h, kv, e = (cfg.d_model, cfg.d_mlp, cfg.d_vocab, cfg.n_heads, cfg.kv_heads,
                         cfg.d_head)  # fmt: skip
    shapes = {"W_E": (V, d), "W_pos": (cfg.n_ctx, d), "ln_final.w": (d,), "ln_final.b": (d,),
              "lm_head": (V, d)}  # fmt: skip
    per_block = {
        "ln1.w": (d,), "ln1.b": (d,), "ln2.w": (d,), "ln2.b": (d,),
        "attn.q": (h * e, d), "attn.k": (kv * e, d), "attn.v": (kv * e, d),
        "attn.q_bias": (h * e,), "attn.k_bias": (kv * e,), "attn.v_bias": (kv * e,),
        "attn.qkv": (3 * h * e, d), "attn.qkv_bias": (3 * h * e,),
        "attn.W_O": (d, h * e), "attn.b_O": (d,),
        "mlp.W_gate": (m, d), "mlp.b_gate": (m,), "mlp.W_in": (m, d), "mlp.b_in": (m,),
        "mlp.W_out": (d, m), "mlp.b_out": (d,),
    }  # fmt: skip
    for i in range(cfg.n_layers):
        shapes |= {f"blocks.{i}.{k}": s for k, s in per_block.items()}
    return shapes


PREFIXES = ("transformer.", "gpt_neox.", "model.")


def strip_prefix(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the base-model prefix of every key (``lm_head``/``embed_out`` have none)."""
    out = {}
    for k, v in weights.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def _ignored(key: str) -> bool:
    """Buffers some checkpoints carry that are not weights (causal masks, rotary tables)."""
    return key.endswith(("attn.bias", "attn.masked_bias", "attention.bias",
                         "attention.masked_bias", "rotary_emb.inv_freq"))  # fmt: skip


def to_resid(
    weights: dict[str, Tensor], cfg: Config, source: str = "the checkpoint"
) -> dict[str, Tensor]:
    """resid's parameters from a family checkpoint's tensors (prefixes allowed), every
    key and shape checked first. Biases a family does not have are zeros."""
    weights = {k: v for k, v in strip_prefix(weights).items() if not _ignored(k)}
    names, shapes = _names(cfg), _shapes(cfg)
    if cfg.positional != "learned":
        names.pop("W_pos", None)
    if cfg.tie_embeddings and names.get("lm_head") in weights:
        tied = weights.pop(names["lm_head"])
        if tied.shape != weights.get(names["W_E"], tied).shape or not torch.equal(
            tied, weights[names["W_E"]]
        ):
            raise CheckpointError(
                f"{source}: the config ties the unembedding, but lm_head differs from the embedding"
            )
    if cfg.tie_embeddings:
        names.pop("lm_head", None)
    wanted = set(names.values())
    missing = sorted(src for src in wanted if src not in weights)
    unexpected = sorted(k for k in weights if k not in wanted)
    misshaped = [
        f"{src}: expected {list(shapes[dst])}, got {list(weights[src].shape)}"
        for dst, src in names.items()
        if src in weights and tuple(weights[src].shape) != shapes[dst]
    ]
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("mis-shaped keys", misshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"{source} does not fit a {SUPPORTED[cfg.architecture]} of this config:\n  "
            + "\n  ".join(parts)
        )
    bad = [f"{k} ({v.dtype})" for k, v in weights.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{source} holds non-floating-point weights: {', '.join(bad[:8])}")
    got = {dst: weights[src] for dst, src in names.items()}
    return _assemble(got, cfg)


def _assemble(got: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Transpose ``nn.Linear`` weights to ``x @ W`` and fuse q, k, v as resid stores them."""
    d, m, h, kv, e = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.kv_heads, cfg.d_head
    zeros = lambda *s: torch.zeros(*s, dtype=got["W_E"].dtype)  # noqa: E731
    state = {"W_E": got["W_E"], "ln_final.w": got["ln_final.w"]}
    if "W_pos" in got:
        state["W_pos"] = got["W_pos"]
    if cfg.normalization == "LN":
        state["ln_final.b"] = got["ln_final.b"]
    if not cfg.tie_embeddings:
        state["lm_head"] = _linear(got["lm_head"])
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            state[f"{b}{ln}.w"] = got[f"{b}{ln}.w"]
            if cfg.normalization == "LN":
                state[f"{b}{ln}.b"] = got[f"{b}{ln}.b"]
        if f"{b}attn.qkv" in got:  # GPT-NeoX: rows grouped per head as [q, k, v]
            W = _linear(got[f"{b}attn.qkv"])
            state[f"{b}attn.W_QKV"] = rearrange(W, "d (h three e) -> d (three h e)", three=3, e=e)
            state[f"{b}attn.b_QKV"] = rearrange(
                got[f"{b}attn.qkv_bias"], "(h three e) -> (three h e)", three=3, e=e
            )
        else:
            state[f"{b}attn.W_QKV"] = torch.cat(
                [_linear(got[f"{b}attn.{x}"]) for x in ("q", "k", "v")], 1
            )
            if f"{b}attn.q_bias" in got:
                state[f"{b}attn.b_QKV"] = torch.cat([got[f"{b}attn.{x}_bias"] for x in "qkv"])
            else:
                state[f"{b}attn.b_QKV"] = zeros((h + 2 * kv) * e)
        state[f"{b}attn.W_O"] = _linear(got[f"{b}attn.W_O"]).reshape(h, e, d)
        state[f"{b}attn.b_O"] = got.get(f"{b}attn.b_O", zeros(d))
        if cfg.gated_mlp:
            state[f"{b}mlp.W_gate"] = _linear(got[f"{b}mlp.W_gate"])
            state[f"{b}mlp.b_gate"] = got.get(f"{b}mlp.b_gate", zeros(m))
        state[f"{b}mlp.W_in"] = _linear(got[f"{b}mlp.W_in"])
        state[f"{b}mlp.b_in"] = got.get(f"{b}mlp.b_in", zeros(m))
        state[f"{b}mlp.W_out"] = _linear(got[f"{b}mlp.W_out"])
        state[f"{b}mlp.b_out"] = got.get(f"{b}mlp.b_out", zeros(d))
    return {k: v.contiguous() for k, v in state.items()}
