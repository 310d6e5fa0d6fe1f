"""Sampling continuations: softmax of the last position's logits over a temperature.

>>> model.generate("The Eiffel Tower is in", max_new_tokens=5, temperature=0)  # greedy
'The Eiffel Tower is in the heart of Paris'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from resid.core.model import Input, Model


def next_token_distribution(
    logits: Float[Tensor, "batch d_vocab"], temperature: float = 1.0, top_k: int | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """softmax(logits / temperature), keeping only the ``top_k`` largest logits if given."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


@torch.inference_mode()
def generate(
    model: Model,
    input: Input,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_at_eos: bool = False,
) -> str | list[str] | Int[Tensor, "batch pos"]:
    """Append ``max_new_tokens`` sampled tokens. ``temperature=0`` is greedy (argmax).

    Strings in give text out (the prompt and its continuation, without the BOS token);
    token ids in give token ids out. ``seed`` makes sampling repeatable. Past ``n_ctx`` the
    model sees the last ``n_ctx`` tokens.
    """
    if temperature < 0 or max_new_tokens < 0:
        raise ValueError("temperature and max_new_tokens must not be negative")
    if isinstance(input, list) and len({len(model.tokenizer.encode(t)) for t in input}) > 1:
        raise ValueError(
            "generate continues each row from its last position, so prompts of different "
            "lengths would continue after padding: generate them one at a time"
        )
    tokens = model.tokens(input)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.cfg.n_ctx :])[:, -1]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = next_token_distribution(logits, temperature, top_k)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if eos is not None:
            nxt = nxt.masked_fill(done, eos)
            done |= nxt == eos
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos is not None and bool(done.all()):
            break
    if isinstance(input, Tensor):
        return tokens
    texts = [model.tokenizer.decode(row[1:]) for row in tokens.tolist()]
    return texts[0] if isinstance(input, str) else texts
