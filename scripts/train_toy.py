"""Train a 2-layer GPT-2 that has to learn induction, and save it as a Hugging Face folder.

Each sequence is random tokens from a 127-token vocabulary in which a random segment
repeats: predicting the repeats needs a previous-token head in layer 0 feeding an
induction head in layer 1 (Olsson et al. 2022). Segments start at a random place (when r
always started at position 1, the model learned positional offsets instead). Deterministic
from the seed; about a minute and a half on 2 CPU cores. The induction score passes 0.5
within the first 500 steps (at a learning rate of 2e-3 with batches of 128 it had not
formed after 3000).

    python scripts/train_toy.py --out notebooks/toy-induction
"""

from __future__ import annotations

import argparse
import time

import torch

import resid
from resid.analysis.detectors import head_scores, repeated_tokens

TOY = resid.Config(n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=128, d_vocab=128, n_ctx=64)
BOS = TOY.d_vocab - 1  # the last id is the toy's <|endoftext|>


def batch_with_repeats(g: torch.Generator, batch: int = 64, seq_len: int = 48) -> torch.Tensor:
    """[BOS] + a random prefix of 0-16 tokens, then a random segment r of 4-24 tokens
    repeated to the end. The repeats are predictable only by finding the earlier copy; r's
    start and length vary, so no position or fixed offset gives them away. In the random
    tokens, 30% copy the token two back ("a b a"): that makes a previous-token head pay
    off on its own, which shortens the plateau before induction."""
    tokens = torch.randint(0, BOS, (batch, seq_len), generator=g)
    aba = torch.rand(batch, seq_len, generator=g) < 0.3
    for t in range(2, seq_len):
        tokens[:, t] = torch.where(aba[:, t], tokens[:, t - 2], tokens[:, t])
    period = torch.randint(4, 25, (batch, 1), generator=g)
    prefix = torch.randint(0, 17, (batch, 1), generator=g)
    j = torch.arange(seq_len)[None]
    tokens = tokens.gather(1, torch.where(j >= prefix, prefix + (j - prefix) % period, j))
    return torch.cat([torch.full((batch, 1), BOS), tokens], dim=1)


@torch.no_grad()
def evaluate(model: resid.Model, seq_len: int = 20) -> dict[str, float]:
    """Loss on the first and on the repeated half of [BOS] + r + r, and the best scores
    of the previous-token heads in layer 0 and the induction heads in layer 1."""
    tokens = repeated_tokens(batch=32, seq_len=seq_len, d_vocab=TOY.d_vocab, bos=BOS, seed=12345)
    logp = model(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    scores = head_scores(model, tokens)
    return {
        "loss_first_half": -logp[:, 1:seq_len].mean().item(),  # predicting r[1:] from r
        "loss_repeated_half": -logp[:, seq_len:].mean().item(),  # predicting the copy
        "previous_token_L0": scores["previous_token"][0].max().item(),
        "induction_L1": scores["induction"][1].max().item(),
    }


def train(seed: int = 0, steps: int = 2000, lr: float = 1e-3, log_every: int = 0) -> resid.Model:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: one thread is faster, and bit-reproducible
    try:
        torch.manual_seed(seed)
        model = resid.Model(TOY)
        # every matrix normal(0, 0.02), as the committed checkpoint was drawn: with GPT-2's
        # smaller residual writes (0.01 for two layers) the induction phase change comes
        # after the 2,000 steps (previous-token 0.44, induction 0.05 at the end)
        model.init_weights(std=0.02, residual_scale=False)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        # linear warm-up, then constant: decaying the rate only lengthens the plateau
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
        for step in range(steps):
            loss = model(batch_with_repeats(g), return_type="loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="notebooks/toy-induction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    start = time.perf_counter()
    model = train(args.seed, args.steps, log_every=250)
    seconds = time.perf_counter() - start
    resid.save(model, args.out)
    print(f"trained in {seconds:.0f} s; saved to {args.out}/")
    for key, value in evaluate(model).items():
        print(f"  {key:<20}{value:.3f}")


if __name__ == "__main__":
    main()
