"""What goes into a model, tokenized and checked once per call.

A model takes strings (tokenized here, with BOS first, padded and masked) or token ids
``[batch, pos]`` / ``[pos]`` with an optional attention mask. :func:`prepare` turns either
into :class:`Inputs`: token ids checked against the vocabulary and the context, on the
model's device, and a boolean mask (``None`` when every token is real). Every entry point
(``model(...)``, ``run_with_cache``, sweeps, path patching, generation) prepares its input
once and hands the :class:`Inputs` on, so nothing downstream checks it again.

>>> batch = prepare(model, ["Hi", "Hello there"])
>>> batch.tokens.shape, batch.mask.shape          # [2, 3], [2, 3]: one row padded
>>> model(batch) is not None                       # no second tokenization, no second check
True
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from resid.core.protocols import ModelLike
from resid.core.tokenizer import Tokenizer

Input = str | list[str] | Tensor
Side = Literal["right", "left"]


class Inputs(NamedTuple):
    """Token ids ``[batch, pos]`` already checked against a model and on its device, and
    their attention mask (``True`` at real tokens; ``None`` when none is padding). Made by
    :func:`prepare`; a model takes one wherever it takes tokens and checks it no further.

    >>> tokens, mask = prepare(model, "Hello")
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"] | None

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape


def prepare(
    model: ModelLike,
    input: Input | Inputs,
    attention_mask: Tensor | None = None,
    padding_side: Side | None = None,
    prepend_bos: bool | None = None,
) -> Inputs:
    """``input`` as :class:`Inputs` for ``model``: strings are tokenized, padded on
    ``padding_side`` (default ``model.padding_side``) and masked; token ids and
    ``attention_mask`` are checked. :class:`Inputs` are returned as they are.

    >>> prepare(model, torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
    """
    if isinstance(input, Inputs):
        if attention_mask is not None:
            raise ValueError(
                "these inputs already carry their attention mask: pass one or the other"
            )
        return input
    if isinstance(input, (str, list)):
        if attention_mask is not None:
            raise ValueError(
                "attention_mask goes with token ids; strings get theirs from to_tokens"
            )
        tokens, mask = to_tokens(
            model.tokenizer,
            input,
            device=model.device,
            padding_side=padding_side or model.padding_side,
            return_attention_mask=True,
            prepend_bos=prepend_bos,
        )
    else:
        tokens, mask = check_tokens(model, input), attention_mask
    return Inputs(tokens, check_mask(mask, tokens.shape, model.device))


def to_tokens(
    tokenizer: Tokenizer,
    input: str | list[str],
    *,
    device: torch.device | str = "cpu",
    prepend_bos: bool | None = None,
    padding_side: Side = "right",
    return_attention_mask: bool = False,
) -> Int[Tensor, "batch pos"] | tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token ids ``[batch, pos]`` of one string or several, ``<|endoftext|>`` (BOS) first
    as TransformerLens does (``prepend_bos=None``: as the tokenizer's ``add_bos_token``
    says, True for GPT-2), padded with the pad token on ``padding_side``;
    ``return_attention_mask=True`` also gives the mask, ``True`` at real tokens.

    >>> to_tokens(Tokenizer.gpt2(), ["Hi", "Hello there"], return_attention_mask=True)
    """
    texts = [input] if isinstance(input, str) else list(input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("to_tokens takes a string or a non-empty list of strings")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    encoded = [tokenizer.encode(t) for t in texts]
    if not all(encoded):
        raise ValueError("an input string is empty: give at least one token of text")
    if prepend_bos is None:
        prepend_bos = tokenizer.add_bos_token
    rows = [([tokenizer.bos_token_id] if prepend_bos else []) + ids for ids in encoded]
    width = max(map(len, rows))
    pads = [[tokenizer.pad_token_id] * (width - len(r)) for r in rows]
    real = [[True] * len(r) for r in rows]
    if padding_side == "right":
        ids = [r + p for r, p in zip(rows, pads, strict=True)]
        mask = [m + [False] * len(p) for m, p in zip(real, pads, strict=True)]
    else:
        ids = [p + r for r, p in zip(rows, pads, strict=True)]
        mask = [[False] * len(p) + m for m, p in zip(real, pads, strict=True)]
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    if not return_attention_mask:
        return tokens
    return tokens, torch.tensor(mask, dtype=torch.bool, device=device)


def check_tokens(model: ModelLike, input: Input) -> Int[Tensor, "batch pos"]:
    """The input as checked token ids on the model's device: integers, ``[batch, pos]``
    (or ``[pos]``), not empty, within the context and the vocabulary. Strings are
    tokenized (with BOS).

    >>> check_tokens(model, torch.tensor([5, 6, 7])).shape     # [1, 3]
    """
    if isinstance(input, Inputs):
        return input.tokens
    if isinstance(input, (str, list)) and all(isinstance(t, str) for t in input):
        return model.to_tokens(input)
    if not isinstance(input, Tensor):
        raise TypeError(
            f"input must be a string, a list of strings or a tensor of token ids, not {type(input).__name__}"
        )
    if input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got a tensor of {input.dtype}")
    tokens = input.unsqueeze(0) if input.dim() == 1 else input
    if tokens.dim() != 2:
        raise ValueError(f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}")
    if tokens.numel() == 0:
        raise ValueError(
            f"the input is empty (shape {tuple(input.shape)}): give at least one token"
        )
    n_ctx, d_vocab = model.cfg.n_ctx, model.cfg.d_vocab
    if tokens.shape[1] > n_ctx:
        raise ValueError(
            f"{tokens.shape[1]} positions is more than the context of {n_ctx}: "
            f"keep the last {n_ctx} with tokens[:, -{n_ctx}:]"
        )
    lo, hi = (int(t) for t in tokens.aminmax())
    if lo < 0 or hi >= d_vocab:
        bad = tokens[(tokens < 0) | (tokens >= d_vocab)].unique()[:5].tolist()
        raise ValueError(
            f"token ids {bad} are outside the vocabulary [0, {d_vocab}): "
            "were they made by another tokenizer?"
        )
    return tokens.to(model.device, torch.long)


def check_mask(
    mask: Tensor | None, shape: tuple[int, ...], device: torch.device | str
) -> Bool[Tensor, "batch pos"] | None:
    """An attention mask as bools on ``device``, or ``None`` if nothing is masked: one entry
    per token of ``shape``, 0/1 or bools, at least one real token per row.

    >>> check_mask(torch.tensor([[0, 1, 1]]), (1, 3), "cpu")
    tensor([[False,  True,  True]])
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor, not {type(mask).__name__}")
    mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the tokens {tuple(shape)}: "
            "one entry per token, 1 (or True) at real tokens and 0 at padding"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or not ((mask == 0) | (mask == 1)).all():
            raise ValueError("attention_mask holds 0/1 (or bools): 1 at real tokens")
        mask = mask.bool()
    if not mask.any(1).all():
        raise ValueError("a row of attention_mask is all padding: give each row a real token")
    mask = mask.to(device)
    return None if bool(mask.all()) else mask


def to_str_tokens(tokenizer: Tokenizer, ids: Tensor | list[int]) -> list[str]:
    """One string per token id of a single sequence.

    >>> to_str_tokens(Tokenizer.gpt2(), [15496, 995])
    ['Hello', ' world']
    """
    if isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[0] != 1:
        raise ValueError("to_str_tokens takes one sequence; index the batch first")
    flat = torch.as_tensor(ids).flatten().tolist() if not isinstance(ids, list) else ids
    return tokenizer.decode_each(flat)


def to_string(tokenizer: Tokenizer, tokens: Tensor | list[int]) -> str | list[str]:
    """Decode ids: ``[pos]`` gives a string, ``[batch, pos]`` a list of strings.

    >>> to_string(Tokenizer.gpt2(), [15496, 995])
    'Hello world'
    """
    t = torch.as_tensor(tokens)
    if t.dim() == 2:
        return [tokenizer.decode(row) for row in t.tolist()]
    return tokenizer.decode(t.flatten().tolist())


def to_single_token(tokenizer: Tokenizer, text: str) -> int:
    """The id of a string that is exactly one token, e.g. ``" Paris"``.

    >>> to_single_token(Tokenizer.gpt2(), " Paris")
    6342
    """
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens, not one: {tokenizer.decode_each(ids)}")
    return ids[0]


def get_token_position(
    model: ModelLike,
    single_token: str | int | Tensor,
    input: str | Tensor,
    mode: str = "first",
    prepend_bos: bool | None = None,
    padding_side: Side | None = None,
    attention_mask: Tensor | None = None,
) -> int | Int[Tensor, " batch"]:
    """Where ``single_token`` (a one-token string or an id) first (``mode="first"``) or
    last (``"last"``) occurs in ``input`` (a string, or token ids), as TransformerLens'
    ``get_token_position``: an int for one sequence. For a batch ``[batch, pos]``, a tensor
    of one position per row, counting only the real tokens ``attention_mask`` marks (the
    position is in the padded row). A row without the token is an error naming it.

    >>> model.get_token_position(" Mary", "When Mary and John went", mode="last")
    """
    if mode not in ("first", "last"):
        raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
    if isinstance(input, str):
        tokens = model.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
    else:
        tokens = check_tokens(model, input)
    if isinstance(single_token, str):
        single_token = model.to_single_token(single_token)
    token = int(single_token)
    mask = check_mask(attention_mask, tokens.shape, tokens.device)
    hit = tokens == token
    if mask is not None:
        hit &= mask
    missing = (~hit.any(1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"token {token} ({to_single_str_token(model.tokenizer, token)!r}) does not occur "
            f"in row(s) {missing} of the input"
        )
    idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    first = torch.where(hit, idx, tokens.shape[1]).min(1).values
    last = torch.where(hit, idx, -1).max(1).values
    where = first if mode == "first" else last
    single = isinstance(input, str) or (isinstance(input, Tensor) and input.dim() == 1)
    return int(where[0]) if single or tokens.shape[0] == 1 and attention_mask is None else where


def to_single_str_token(tokenizer: Tokenizer, token: int | Tensor) -> str:
    """The text of one token id (TransformerLens' ``to_single_str_token``).

    >>> to_single_str_token(Tokenizer.gpt2(), 50256)
    '<|endoftext|>'
    """
    t = torch.as_tensor(token)
    if t.numel() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"to_single_str_token takes one integer token id, not {token!r}")
    return tokenizer.decode_each([int(t)])[0]
