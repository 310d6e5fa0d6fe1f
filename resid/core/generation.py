"""Generation with a KV cache: the prompt runs once, then one position per step.

>>> model.generate("The Eiffel Tower is in", max_new_tokens=5, temperature=0)  # greedy
'The Eiffel Tower is in the heart of Paris'
>>> model.generate(["Hi", "The capital of France is"], 5, temperature=0)  # left-padded batch
>>> for tokens in stream(model, "Once upon a time", 10, seed=0):  # one [batch] per step
...     print(model.to_string(tokens), end="")

Prompts of different lengths are left-padded and masked, so each row continues from its
own last token and generates exactly what it would alone. Hooks attached by the caller
(``with model.hooks(...)``) fire on every forward: once for the prompt, then once per new
token, and each call sees **only that forward's new positions** (``[batch, 1, ...]`` after
the prompt), as in TransformerLens. A hook that needs the whole sequence at every step
should run with ``use_kv_cache=False``.
"""

from __future__ import annotations

import contextvars
import math
import numbers
from collections.abc import Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from resid.core import hooks
from resid.core.inputs import Input, Inputs
from resid.core.kv_cache import KVCache
from resid.core.protocols import ModelLike


def next_token_distribution(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """``softmax(logits / temperature)`` over the ``top_k`` largest logits and, of those, the
    smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus
    sampling; the most likely token is always kept). Filters apply in Hugging Face's order:
    temperature, then top-k, then top-p.

    >>> next_token_distribution(torch.tensor([[0.0, 1.0, 2.0]]), temperature=2.0, top_k=2)
    tensor([[0.0000, 0.3775, 0.6225]])
    """
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def _check_args(
    model: ModelLike,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, not {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, not {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 is greedy), not {temperature}"
        )
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k <= 0
    ):
        raise ValueError(f"top_k must be a positive int (or None for no limit), not {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool)
        or not isinstance(top_p, numbers.Real)
        or not math.isfinite(top_p)
        or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), not {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")


def _eos_id(model: ModelLike, stop_at_eos: bool | None, eos_token_id: int | None) -> int | None:
    """The id generation stops at: ``eos_token_id``, else the tokenizer's EOS; ``None``
    with ``stop_at_eos=False``, or by default (``None``) for a model with no tokenizer."""
    if stop_at_eos is not None and not isinstance(stop_at_eos, bool):
        raise TypeError(f"stop_at_eos must be True, False or None, not {stop_at_eos!r}")
    if stop_at_eos is False:
        return None
    if eos_token_id is None:
        try:
            eos_token_id = model.tokenizer.eos_token_id
        except ValueError as e:
            if stop_at_eos is None:  # the default: nothing says which token ends a text
                return None
            raise ValueError(f"{e}; or pass eos_token_id= to generate") from None
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, numbers.Integral):
        raise TypeError(f"eos_token_id must be an int, not {type(eos_token_id).__name__}")
    if not 0 <= eos_token_id < model.cfg.d_vocab:
        raise ValueError(
            f"eos_token_id={eos_token_id} is outside the vocabulary [0, {model.cfg.d_vocab})"
        )
    return int(eos_token_id)


def _pad_id(model: ModelLike, eos: int) -> int:
    """What finished rows get: the tokenizer's pad token (GPT-2's is its EOS), else EOS."""
    try:
        return model.tokenizer.pad_token_id
    except ValueError:  # a model with a vocabulary of its own and no tokenizer
        return eos


def left_padded(
    model: ModelLike, input: Input, attention_mask: Tensor | None = None
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"] | None]:
    """The prompts as token ids with every row's real tokens at the right end, and their
    mask (``None`` when nothing is padding). Strings are tokenized with BOS and padded on
    the left; token ids with a mask padded elsewhere have their real tokens moved to the
    end, in order (which changes nothing the model computes: positions count real tokens).

    >>> tokens, mask = left_padded(model, ["Hi", "Hello there"])
    """
    if isinstance(input, (str, list)):
        if attention_mask is not None:
            raise ValueError(
                "attention_mask goes with token ids; strings get theirs from to_tokens"
            )
        tokens, mask = model.to_tokens(input, padding_side="left", return_attention_mask=True)
    else:
        tokens = model.tokens(input)
        mask = attention_mask
    mask = model.check_mask(mask, tokens.shape)
    if mask is None:
        return tokens, None
    order = mask.int().sort(dim=1, stable=True).indices  # padding first, each side in order
    return tokens.gather(1, order), mask.gather(1, order)


def stream(
    model: ModelLike,
    input: Input,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    use_kv_cache: bool = True,
    _logits: list[Tensor] | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """Generate token by token: yields each step's new tokens, ``[batch]``, as soon as they
    are chosen. Arguments as ``generate``; prompts are left-padded as there.

    The generator keeps the hooks and spliced SAEs of the context it was made in (the call
    to ``stream``) and runs every step with them, wherever it is iterated from: another
    thread, ``asyncio.to_thread``, a web framework's copied context, or after the ``with``
    block that attached them has ended. Hooks attached only around a later ``next`` would
    not run, so they are refused with a ``ValueError``: attach them before calling ``stream``.

    >>> for tokens in stream(model, ["Hi", "Hello there"], 10, temperature=0):
    ...     print(model.to_string(tokens[:, None]))
    >>> with model.hooks([("blocks.3.hook_resid_pre", steer)]):
    ...     steps = stream(model, "Hi", 10)
    >>> await asyncio.to_thread(next, steps)    # steered, though run in another context
    """
    args = (max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, eos_token_id)
    started = contextvars.copy_context()  # its hooks and splices, whoever iterates
    return _steps(started, model, input, *args, attention_mask, use_kv_cache, _logits)


def _hooked_here_only(model: ModelLike, started: contextvars.Context) -> list[str]:
    """The sites with hooks (or splices) in the caller's context that the context
    ``started`` lacks."""
    table = hooks.current()
    if not table or table is started.run(hooks.current):  # none, or the very same hooks
        return []
    now = {(site, d, id(fn)) for site, d, fn, _ in hooks.listed(model.hook_dict)}
    if not now:
        return []
    then = started.run(lambda: {(s, d, id(f)) for s, d, f, _ in hooks.listed(model.hook_dict)})
    return sorted({site for site, *_ in now - then})


@torch.inference_mode()
def _steps(
    started: contextvars.Context,
    model: ModelLike,
    input: Input,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop_at_eos: bool | None,
    eos_token_id: int | None,
    attention_mask: Tensor | None,
    use_kv_cache: bool,
    _logits: list[Tensor] | None,
) -> Iterator[Int[Tensor, " batch"]]:
    """``stream``'s steps, each forward run in the context ``started``."""

    def forward(inputs: Inputs, cache: KVCache | None) -> Tensor:
        late = _hooked_here_only(model, started)
        if late:
            raise ValueError(
                f"hooks on {late} were attached after this generator was made: a generator "
                "runs every step with the hooks and SAEs of the context it was made in, so "
                "these would not run. Attach them before calling stream (or generate)"
            )
        return started.run(model, inputs, past_kv_cache=cache)[:, -1]

    _check_args(model, max_new_tokens, temperature, top_k, top_p, seed)
    eos = _eos_id(model, stop_at_eos, eos_token_id)
    tokens, mask = left_padded(model, input, attention_mask)
    width = tokens.shape[1]
    if width + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"{width} prompt positions (padding included) + max_new_tokens={max_new_tokens} is "
            f"more than the context of {model.cfg.n_ctx}: ask for at most "
            f"{max(model.cfg.n_ctx - width, 0)} new tokens, or shorten the prompt"
        )
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(int(seed))
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    pad = None if eos is None else _pad_id(model, eos)
    cache = KVCache(model) if use_kv_cache else None
    logits = forward(Inputs(tokens, mask), cache)  # checked once, above
    for step in range(max_new_tokens):
        if _logits is not None:
            _logits.append(logits.clone())
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = next_token_distribution(logits, temperature, top_k, top_p)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if eos is not None:
            nxt = nxt.masked_fill(done, pad)  # finished rows get the pad token
            done |= nxt == eos
        yield nxt
        if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
            return
        if cache is not None:
            logits = forward(Inputs(nxt[:, None], None), cache)  # ids < d_vocab
        else:
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            logits = forward(Inputs(tokens, mask), None)


@torch.inference_mode()
def generate(
    model: ModelLike,
    input: Input,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    use_kv_cache: bool = True,
    return_logits: bool = False,
) -> (
    str
    | list[str]
    | Int[Tensor, "batch pos"]
    | tuple[str | list[str] | Int[Tensor, "batch pos"], Float[Tensor, "batch new d_vocab"]]
):
    """Continue the input by ``max_new_tokens`` tokens, with a KV cache.

    The prompt runs once (the prefill) and each later step runs only the one new position
    against the cached keys and values. Hooks attached by the caller fire on every step,
    each seeing **only that step's new positions** (``[batch, 1, ...]`` after the prefill);
    ``use_kv_cache=False`` reruns the whole sequence each step instead, so hooks see it all.

    - ``input``: a string or list of strings (tokenized with BOS, padded on the **left** and
      masked), or token ids ``[batch, pos]`` with an optional ``attention_mask`` (1 at real
      tokens). Rows are left-aligned so that each continues from its own last real token
      and generates exactly what it would alone.
    - ``temperature=0`` is greedy (argmax; ``top_k``/``top_p`` then change nothing);
      otherwise tokens are sampled from ``next_token_distribution(logits, temperature,
      top_k, top_p)``. ``seed`` makes sampling repeatable (its own generator: the global
      RNG is untouched).
    - Generation stops at the end-of-sequence token by default, as in Hugging Face's and
      TransformerLens' ``generate``: a row that emits ``eos_token_id`` (default the
      tokenizer's: GPT-2's ``<|endoftext|>``, SmolLM2's ``<|im_end|>``) is finished, and
      gets the pad token (EOS for a model without a tokenizer) from then on; generation
      stops early once every row is finished. ``stop_at_eos=False`` always generates
      ``max_new_tokens``; the default (``None``) does not stop for a model with neither a
      tokenizer nor ``eos_token_id``, where ``stop_at_eos=True`` raises.
    - The prompt (padding included) plus ``max_new_tokens`` must fit in ``n_ctx``: with a KV
      cache the window is never slid, so a longer request is refused.

    Strings in give strings out: prompt and continuation, without BOS and padding, cut
    before the EOS that finished the row. Token ids in give ids out, ``[batch, pos + new]``,
    the prompt left-padded. ``return_logits=True`` also returns the logits each new token
    was chosen from, ``[batch, new, d_vocab]`` (before temperature and filtering).

    >>> model.generate("The Eiffel Tower is in", max_new_tokens=5, temperature=0)
    >>> tokens, mask = model.to_tokens(["Hi", "Hello there"], padding_side="left",
    ...                                return_attention_mask=True)
    >>> model.generate(tokens, 10, attention_mask=mask, top_p=0.9, seed=0)  # [2, pos + 10]
    """
    _check_args(model, max_new_tokens, temperature, top_k, top_p, seed)
    eos = _eos_id(model, stop_at_eos, eos_token_id)
    tokens, mask = left_padded(model, input, attention_mask)
    logits: list[Tensor] = []
    steps = stream(
        model,
        tokens,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_at_eos=stop_at_eos,
        eos_token_id=eos_token_id,
        attention_mask=mask,
        use_kv_cache=use_kv_cache,
        _logits=logits if return_logits else None,
    )
    new = list(steps)
    if new:
        tokens = torch.cat([tokens, torch.stack(new, 1)], 1)
    if isinstance(input, Tensor):
        out = tokens
    else:
        width = tokens.shape[1] - len(new)
        real = [[True] * width] * len(tokens) if mask is None else mask.tolist()
        texts = []
        for row, row_real in zip(tokens.tolist(), real, strict=True):
            prompt = [t for t, m in zip(row[:width], row_real, strict=True) if m]
            cont = row[width:]
            if eos is not None and eos in cont:
                cont = cont[: cont.index(eos)]
            bos = 1 if model.tokenizer.add_bos_token else 0  # to_tokens put BOS first
            texts.append(model.tokenizer.decode(prompt[bos:] + cont))
        out = texts[0] if isinstance(input, str) else texts
    if not return_logits:
        return out
    if not logits:
        empty = (tokens.shape[0], 0, model.cfg.d_vocab)
        return out, torch.zeros(empty, dtype=model.dtype, device=model.device)
    return out, torch.stack(logits, 1)
