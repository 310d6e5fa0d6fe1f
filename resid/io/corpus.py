"""Text corpora for ``resid harvest``: documents in, fixed-length token contexts out.

A corpus is one of

- a ``.txt`` file: one document per line (blank lines skipped);
- a ``.jsonl`` file: one JSON object per line, the document under ``text_field``;
- a folder saved by Hugging Face ``datasets`` (``Dataset.save_to_disk``), read offline
  with ``load_from_disk`` when ``datasets`` is installed (it is not a dependency of resid).

Contexts are made the way SAELens and TransformerLens make them:

- ``mode="concat"``: the documents are joined into one token stream with ``<|endoftext|>``
  between them, and the stream is cut into rows of ``length - 1`` tokens, each with BOS
  prepended (every row is exactly ``length`` tokens; the last partial row is dropped);
- ``mode="rows"``: one document per row, BOS first, cut at ``length`` tokens; rows are
  padded when batched and the padding is masked.

The order is deterministic: context ``i`` is the same whichever process reads it, which
is what lets ``resid harvest`` split a corpus across ranks and resume a killed run.

>>> corpus = open_corpus("docs.jsonl", text_field="text")
>>> for ids, done in contexts(corpus, model.tokenizer, length=128):
...     ...   # ids: list of 128 token ids; done: the fraction of the corpus read so far
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from resid.core.tokenizer import Tokenizer

try:  # optional: only for saved Hugging Face datasets
    import datasets
except ImportError:  # pragma: no cover - depends on the environment
    datasets = None

Mode = Literal["concat", "rows"]
_ENCODE_BATCH = 256  # documents tokenized together


class CorpusError(ValueError):
    """A corpus that cannot be read as documents; the message names the file and the fix."""


@dataclass(frozen=True)
class Corpus:
    """A corpus on disk: ``kind`` is ``"txt"``, ``"jsonl"`` or ``"datasets"``."""

    path: Path
    kind: str
    text_field: str = "text"
    split: str | None = None

    def documents(self) -> Iterator[tuple[str, float]]:
        """``(text, fraction of the corpus read)`` for every document, in order."""
        if self.kind == "datasets":
            yield from self._dataset_documents()
            return
        size = max(os.path.getsize(self.path), 1)
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"line {number} of {self.path} is not UTF-8 ({e})") from None
                if self.kind == "txt":
                    text = line.rstrip("\r\n")
                else:
                    text = self._json_text(line, number)
                if text is not None and text.strip():
                    yield text, f.tell() / size

    def _json_text(self, line: str, number: int) -> str | None:
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except ValueError as e:
            raise CorpusError(f"line {number} of {self.path} is not JSON: {e}") from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"line {number} of {self.path} is a JSON {type(record).__name__}, not an object "
                f"with a {self.text_field!r} field"
            )
        if self.text_field not in record:
            fields = ", ".join(map(repr, list(record)[:10])) or "none"
            raise CorpusError(
                f"line {number} of {self.path} has no {self.text_field!r} field (its fields: "
                f"{fields}): pass the right one with --text-field"
            )
        text = record[self.text_field]
        if not isinstance(text, str):
            raise CorpusError(
                f"line {number} of {self.path}: {self.text_field!r} is a "
                f"{type(text).__name__}, not a string"
            )
        return text

    def _load_dataset(self):
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            split = self.split or ("train" if "train" in ds else None)
            if split is None or split not in ds:
                raise CorpusError(f"{self.path} holds the splits {splits}: choose one with --split")
            ds = ds[split]
        if self.text_field not in ds.column_names:
            raise CorpusError(
                f"{self.path} has no {self.text_field!r} column (its columns: "
                f"{', '.join(ds.column_names)}): pass the right one with --text-field"
            )
        return ds

    def _dataset_documents(self) -> Iterator[tuple[str, float]]:
        ds = self._load_dataset().select_columns([self.text_field])
        n = max(len(ds), 1)
        i = 0
        for batch in ds.iter(batch_size=1000):
            for text in batch[self.text_field]:
                i += 1
                if not isinstance(text, str):
                    raise CorpusError(
                        f"row {i - 1} of {self.path}: {self.text_field!r} is a "
                        f"{type(text).__name__}, not a string"
                    )
                if text.strip():
                    yield text, i / n

    def fingerprint(self) -> str:
        """SHA-256 of the corpus files (a dataset folder: of its files' names and bytes)."""
        digest = hashlib.sha256()
        paths = (
            [self.path]
            if self.path.is_file()
            else sorted(p for p in self.path.rglob("*") if p.is_file())
        )
        for p in paths:
            digest.update(p.relative_to(self.path.parent).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


def open_corpus(path: str | Path, text_field: str = "text", split: str | None = None) -> Corpus:
    """Check that ``path`` is a corpus resid can read, and say which kind.

    >>> open_corpus("wiki.txt").kind
    'txt'
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir():
        if datasets is None:
            raise CorpusError(
                f"{path} is a folder: resid reads folders saved by Hugging Face datasets, "
                "which is not installed (pip install datasets), or give a .txt/.jsonl file"
            )
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise CorpusError(
                f"{path} is a folder but not one saved by datasets' save_to_disk "
                "(no dataset_info.json or dataset_dict.json)"
            )
        return Corpus(path, "datasets", text_field, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return Corpus(path, "jsonl", text_field, split)
    if suffix in (".txt", ".text", ""):
        return Corpus(path, "txt", text_field, split)
    raise CorpusError(
        f"{path}: resid reads .txt (one document per line), .jsonl (one JSON object per line "
        "with a text field) or a saved datasets folder, not {suffix!r}"
    )


def contexts(
    corpus: Corpus, tokenizer: Tokenizer, length: int, mode: Mode = "concat"
) -> Iterator[tuple[list[int], float]]:
    """Token contexts, in corpus order, with the fraction of the corpus read so far.

    ``concat``: every context is BOS + ``length - 1`` tokens of the documents joined by
    ``<|endoftext|>``; ``rows``: BOS + the first ``length - 1`` tokens of one document.

    >>> next(contexts(open_corpus("a.txt"), model.tokenizer, 8))[0]   # 8 ids, BOS first
    """
    if mode not in ("concat", "rows"):
        raise ValueError(f"mode must be 'concat' or 'rows', not {mode!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"the context length must be an int >= 2, not {length!r}")
    bos = tokenizer.bos_token_id
    body = length - 1
    stream: list[int] = []
    for ids, fraction in _encoded(corpus, tokenizer):
        if mode == "rows":
            yield [bos, *ids[:body]], fraction
            continue
        stream.extend(ids)
        stream.append(bos)
        start = 0
        while len(stream) - start >= body:
            yield [bos, *stream[start : start + body]], fraction
            start += body
        del stream[:start]


def _encoded(corpus: Corpus, tokenizer: Tokenizer) -> Iterator[tuple[list[int], float]]:
    texts: list[str] = []
    fractions: list[float] = []

    def flush():
        encoded = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
        for enc, fraction in zip(encoded, fractions, strict=True):
            if enc.ids:
                yield enc.ids, fraction
        texts.clear()
        fractions.clear()

    for text, fraction in corpus.documents():
        texts.append(text)
        fractions.append(fraction)
        if len(texts) == _ENCODE_BATCH:
            yield from flush()
    if texts:
        yield from flush()
