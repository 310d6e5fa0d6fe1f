"""Write a small random GPT-2 as Hugging Face saves it (config.json + model.safetensors).

For trying resid with no network: `python scripts/make_tiny_gpt2.py tiny-gpt2 && resid compare tiny-gpt2`.
The weights are scaled up from GPT-2's init so that logits are O(1-10), not near zero.
"""

import argparse

from resid.io.references import random_hf_gpt2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", help="folder to write")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--std", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.d_model, n_positions=256)
    random_hf_gpt2(args.seed, args.std, **shape).save_pretrained(args.out)
    print(f"wrote a random {args.layers}-layer GPT-2 to {args.out}/")


if __name__ == "__main__":
    main()
