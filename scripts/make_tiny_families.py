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
COMMON = dict(vocab_size=V, bos_token_id=EOT, eos_token_id=EOT, max_position_embeddings=512,
              pad_token_id=None)  # fmt: skip
# folder -> (family, its size: each family's layout is resid.io.references.random_hf_family's)
SIZES = {
    "pythia": ("pythia", dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=8, intermediate_size=512)),
    # Llama 3.2: 32 query heads sharing 8 key/value heads
    "llama": ("llama", dict(
        hidden_size=256, num_hidden_layers=5, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=512,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    # GPT-Neo: a local window of 256
    "neo": ("gpt_neo", dict(hidden_size=128, num_layers=2, num_heads=4, window_size=256)),
    "mistral": ("mistral", dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=256, sliding_window=256)),
    "qwen2": ("qwen2", dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=256)),
}  # fmt: skip


def write(out: str | Path, families: list[str] | None = None, std: float = 0.1, seed: int = 0):
    """Write ``out/<folder>/`` for each folder of SIZES (default: all) and return them."""
    from resid.io.references import random_hf_family  # transformers: the dev extra

    out = Path(out)
    written = []
    for name in families or list(SIZES):
        family, size = SIZES[name]
        model = random_hf_family(family, seed=seed, std=std, **COMMON, **size)
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
