"""Write small random checkpoints of each model family resid loads (GPT-Neo, Pythia, Llama,
Mistral, Qwen2), as `transformers` saves them, with GPT-2's vocabulary: offline stand-ins
for the hub models the README's "Model families" section names.

`python scripts/make_tiny_families.py random-families` writes `random-families/pythia/`,
`.../llama/`, `.../neo/`, `.../mistral/` and `.../qwen2/` (about 10 s and 120 MB), each in
its family's layout (rotary, grouped-query heads, SwiGLU, local attention, sliding window,
q/k/v biases) and big enough for the README's layer and head numbers. With no tokenizer
file in the folder, resid gives them GPT-2's tokenizer. Random weights: shapes, not findings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from make_tiny_gpt2 import save  # this folder: atomic, with the umask's permissions

V = 50257  # GPT-2's vocabulary, so GPT-2's tokenizer fits
EOT = V - 1  # <|endoftext|>: BOS and EOS


def models() -> dict:
    """family -> a function building the random transformers model."""
    from transformers import (  # the dev extra
        GPTNeoConfig,
        GPTNeoForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=V, bos_token_id=EOT, eos_token_id=EOT, max_position_embeddings=512)
    return {
        # Pythia: rotary on 25 % of each head, attention and MLP in parallel, untied unembedding
        "pythia": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=8, intermediate_size=512,
            rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False, **common)),
        # Llama 3.2: 32 query heads sharing 8 key/value heads, SwiGLU, Llama 3 rotary scaling
        "llama": lambda: LlamaForCausalLM(LlamaConfig(
            hidden_size=256, num_hidden_layers=5, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=512, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
            **common)),
        # GPT-Neo: global then local attention (a window of 256), unscaled scores
        "neo": lambda: GPTNeoForCausalLM(GPTNeoConfig(
            hidden_size=128, num_layers=2, num_heads=4, window_size=256,
            attention_types=[[["global", "local"], 1]], **common)),
        # Mistral: as Llama, with a sliding window
        "mistral": lambda: MistralForCausalLM(MistralConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=256, sliding_window=256, **common)),
        # Qwen2: as Llama, with q/k/v biases
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=256, **common)),
    }  # fmt: skip


def write(out: str | Path, families: list[str] | None = None, std: float = 0.1, seed: int = 0):
    """Write ``out/<family>/`` for each family (default: all) and return the folders."""
    import torch

    out, builders = Path(out), models()
    written = []
    for name in families or list(builders):
        torch.manual_seed(seed)
        model = builders[name]().eval()
        with torch.no_grad():  # std ``std`` everywhere, norm gains near 1: logits are O(1)
            for pname, p in model.named_parameters():
                gain = p.dim() == 1 and "norm" in pname and pname.endswith("weight")
                p.normal_(1.0 if gain else 0.0, std)
        out.mkdir(parents=True, exist_ok=True)
        written.append(save(model, out / name))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write the families' folders into")
    p.add_argument("--families", help="comma-separated (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    families = args.families.split(",") if args.families else None
    for folder in write(args.out, families, seed=args.seed):
        print(f"wrote a random {folder.name} to {folder}/")


if __name__ == "__main__":
    main()
