"""The tokenizer a GGUF file describes in its metadata: no ``tokenizer.json`` needed.

llama.cpp stores a byte-level BPE tokenizer (``tokenizer.ggml.model`` = ``gpt2``: GPT-2,
Llama 3, SmolLM, Qwen2 ...) as its vocabulary (``tokenizer.ggml.tokens``, id = index), its
merges, a type per token (control tokens are special: ``<|im_end|>`` stays one token) and
the ids of BOS, EOS and padding, with ``add_bos_token``. It is rebuilt here with the
``tokenizers`` library as transformers' GGUF loader builds it (the same pre-tokenizer
choices), so the two agree token for token.

>>> tokenizer = tokenizer_from_metadata(read_header("model.gguf").metadata, "model.gguf", 49152)
>>> tokenizer.encode("Hello<|im_end|>")
[19556, 2]
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from resid.core.tokenizer import Tokenizer
from resid.io.errors import CheckpointError

# transformers' pre-tokenizer split for the llama-3 family of byte-level vocabularies
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {name: LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print stand for themselves)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def _strings(metadata: dict, path, key: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{path}: {key} must be an array of strings")
    return value


def tokenizer_from_metadata(metadata: dict, path: str | Path, d_vocab: int) -> Tokenizer | None:
    """The byte-level BPE tokenizer a GGUF's metadata describes (``tokenizer.ggml.model``
    ``gpt2``): vocabulary, merges, control tokens as special tokens, user-defined tokens
    kept whole, BOS/EOS/pad and ``add_bos_token``. ``None`` for a file with no tokenizer or
    another kind (pass token ids then)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        return None
    tokens = _strings(metadata, path, "tokenizer.ggml.tokens")
    if len(tokens) > d_vocab:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokens)} tokens but the model only {d_vocab}"
        )
    merges = []
    for m in _strings(metadata, path, "tokenizer.ggml.merges"):
        pair = m.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{path}: the merge {m!r} is not two tokens")
        merges.append((pair[0], pair[1]))
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type does not match the tokens")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. a merge of unknown tokens
        raise CheckpointError(
            f"{path}: the tokenizer's vocabulary and merges disagree: {e}"
        ) from None
    split = SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, types, strict=True))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in kinds if k == CONTROL and set(t) <= alphabet])  # fmt: skip
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in kinds if k == USER_DEFINED and t in vocab])  # fmt: skip

    def token(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {i!r} is not a token id")
        return tokens[i]

    eos = token("eos_token_id")
    bos = token("bos_token_id") or eos
    if bos is None:
        return None
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", False)
    return Tokenizer(backend, bos=bos, eos=eos, pad=token("padding_token_id"),
                     add_bos_token=bool(add_bos))  # fmt: skip
