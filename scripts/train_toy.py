"""Train a 2-layer GPT-2 that has to learn induction, and save it as a Hugging Face folder.

Each training sequence is random tokens in which one random segment appears twice: the
second copy can be predicted only by finding the first (a previous-token head in layer 0
feeding an induction head in layer 1, Olsson et al. 2022). Deterministic from the seed;
about a minute on 2 CPU cores.

    python scripts/train_toy.py --out notebooks/toy-induction
"""

from __future__ import annotations

import argparse
import time

import torch

import resid
from resid.detectors import head_scores, repeated_tokens

TOY = resid.Config(n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=128, d_vocab=512, n_ctx=64)
BOS = TOY.d_vocab - 1  # the last id is the toy's <|endoftext|>


def batch_with_repeats(g: torch.Generator, batch: int = 32, seq_len: int = 48) -> torch.Tensor:
    """[BOS] + r + r + random tail, with r of 6–24 random tokens: the copy of r is
    predictable only by induction, and its varying length rules out a fixed offset."""
    tokens = torch.randint(0, BOS, (batch, seq_len), generator=g)
    for row in tokens:
        n = int(torch.randint(6, 25, (1,), generator=g))
        row[n : 2 * n] = row[:n]
    return torch.cat([torch.full((batch, 1), BOS), tokens], dim=1)


@torch.no_grad()
def evaluate(model: resid.Model, seq_len: int = 20) -> dict[str, float]:
    """Loss on the first and on the repeated half of [BOS] + r + r, and the best scores
    of the previous-token heads in layer 0 and the induction heads in layer 1."""
    tokens = repeated_tokens(batch=32, seq_len=seq_len, d_vocab=BOS, bos=BOS, seed=12345)
    logp = model(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    scores = head_scores(model, tokens)
    return {
        "loss_first_half": -logp[:, 1:seq_len].mean().item(),  # predicting r[1:] from r
        "loss_repeated_half": -logp[:, seq_len:].mean().item(),  # predicting the copy
        "previous_token_L0": scores["previous_token"][0].max().item(),
        "induction_L1": scores["induction"][1].max().item(),
    }


def train(seed: int = 0, steps: int = 600, lr: float = 3e-3, log_every: int = 0) -> resid.Model:
    torch.manual_seed(seed)
    model = resid.Model(TOY)
    model.init_weights(std=0.02)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        loss = model(batch_with_repeats(g), return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="notebooks/toy-induction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    start = time.perf_counter()
    model = train(args.seed, args.steps, log_every=100)
    seconds = time.perf_counter() - start
    resid.save(model, args.out)
    print(f"trained in {seconds:.0f} s; saved to {args.out}/")
    for key, value in evaluate(model).items():
        print(f"  {key:<20}{value:.3f}")


if __name__ == "__main__":
    main()
