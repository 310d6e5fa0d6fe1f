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

Reading is bounded: a line is read and tokenized in pieces of at most ``PIECE_CHARS``
characters, cut where whitespace follows a non-space (where GPT-2-style pre-tokenizers cut
anyway, so the tokens are those of the whole line for byte-level BPE tokenizers), and only
as far as the contexts asked for: a 20 MB file with no newline costs a few pieces' worth
of memory, not the whole line's. A ``.jsonl`` record must be parsed whole, so a record
line over ``MAX_RECORD_BYTES`` is refused, as is JSON nested past Python's recursion limit
or a text holding a lone surrogate (not valid Unicode).

>>> corpus = open_corpus("docs.jsonl", text_field="text")
>>> for ids, done in contexts(corpus, model.tokenizer, length=128):
...     ...   # ids: list of 128 token ids; done: the fraction of the corpus read so far
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from resid.core.tokenizer import Tokenizer


def _datasets():
    """Hugging Face ``datasets`` (optional, only for saved datasets folders), imported on
    first use: it takes seconds to import, and most corpora are plain files."""
    return importlib.import_module("datasets")


Mode = Literal["concat", "rows"]
_ENCODE_BATCH = 256  # pieces tokenized together, at most
_ENCODE_CHARS = 1 << 18  # characters tokenized together, at most
PIECE_CHARS = 1 << 16  # characters of a document tokenized at once, at most
MAX_RECORD_BYTES = 64 << 20  # a .jsonl line longer than this is refused
_READ_BYTES = 1 << 16  # bytes read from a .txt line at a time
_CUT = re.compile(r"\S(?=\s)")  # a non-space followed by whitespace: cut after it


class CorpusError(ValueError):
    """A corpus that cannot be read as documents; the message names the file and the fix."""


@dataclass(frozen=True)
class Corpus:
    """A corpus on disk: ``kind`` is ``"txt"``, ``"jsonl"`` or ``"datasets"``."""

    path: Path
    kind: str
    text_field: str = "text"
    split: str | None = None

    def documents(self) -> Iterator[tuple[str, float, bool]]:
        """``(piece, fraction of the corpus read, starts a document)`` in order: each
        document as one or more consecutive pieces of at most ``PIECE_CHARS`` characters
        (see the module docstring); blank documents are skipped."""
        if self.kind == "datasets":
            for text, fraction in self._dataset_documents():
                yield from _pieces(iter([text]), fraction)
            return
        size = max(os.path.getsize(self.path), 1)
        with open(self.path, "rb") as f:
            number = 0
            while True:
                number += 1
                if self.kind == "jsonl":
                    raw = f.readline(MAX_RECORD_BYTES + 1)
                    if not raw:
                        return
                    if len(raw) > MAX_RECORD_BYTES:
                        raise CorpusError(
                            f"line {number} of {self.path} is longer than "
                            f"{MAX_RECORD_BYTES >> 20} MiB: resid parses a .jsonl record whole, "
                            "so split the document, or give the text as a .txt file"
                        )
                    text = self._json_text(_decode(raw, number, self.path), number)
                    if text is not None:
                        yield from _pieces(iter([text]), f.tell() / size)
                    continue
                first = f.readline(_READ_BYTES)
                if not first:
                    return
                yield from _pieces(_line_parts(f, first, number, self.path), size, f)

    def _json_text(self, line: str, number: int) -> str | None:
        """The text field of record ``number`` (None for a blank line), checked."""
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except ValueError as e:
            raise CorpusError(f"line {number} of {self.path} is not JSON: {e}") from None
        except RecursionError:
            raise CorpusError(
                f"line {number} of {self.path} nests JSON deeper than resid reads: a record "
                "must be an object with a text field"
            ) from None
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
        _check_unicode(text, f"line {number} of {self.path}")
        return text

    def _load_dataset(self):
        datasets = _datasets()
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
                _check_unicode(text, f"row {i - 1} of {self.path}")
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
        if importlib.util.find_spec("datasets") is None:
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
    if not path.is_file():
        raise CorpusError(
            f"corpus {path} is not a regular file (a device, FIFO or socket would be read "
            "forever): give a .txt/.jsonl file or a saved datasets folder"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return Corpus(path, "jsonl", text_field, split)
    if suffix in (".txt", ".text", ""):
        return Corpus(path, "txt", text_field, split)
    raise CorpusError(
        f"{path}: resid reads .txt (one document per line), .jsonl (one JSON object per line "
        f"with a text field) or a saved datasets folder, not {suffix!r}"
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
    row: list[int] | None = None  # rows mode: the document being read
    open_doc = False  # concat mode: the last document gave tokens and awaits its BOS
    fraction = 0.0
    for ids, fraction, start in _encoded(corpus, tokenizer):
        if mode == "rows":
            if start:
                if row:
                    yield [bos, *row], fraction
                row = []
            if row is not None and len(row) < body:
                row.extend(ids[: body - len(row)])
            continue
        if start and open_doc:
            stream.append(bos)  # documents are joined by BOS (<|endoftext|>)
            open_doc = False
        stream.extend(ids)
        open_doc = open_doc or bool(ids)
        yield from _cut(stream, bos, body, fraction)
    if mode == "rows" and row:
        yield [bos, *row], fraction
    if mode == "concat" and open_doc:
        stream.append(bos)
        yield from _cut(stream, bos, body, fraction)


def _cut(stream: list[int], bos: int, body: int, fraction: float):
    """Contexts (BOS + ``body`` tokens) cut from the front of ``stream``, which keeps the
    rest."""
    begin = 0
    while len(stream) - begin >= body:
        yield [bos, *stream[begin : begin + body]], fraction
        begin += body
    del stream[:begin]


def _decode(raw: bytes, number: int, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"line {number} of {path} is not UTF-8 ({e})") from None


def _check_unicode(text: str, where: str) -> None:
    """Refuse a lone surrogate (JSON can spell one; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        raise CorpusError(
            f"{where} holds {bad}, a lone surrogate (half of a UTF-16 pair), which is not "
            "valid Unicode: fix or drop the record"
        ) from None


def _line_parts(f, first: bytes, number: int, path: Path) -> Iterator[str]:
    """One ``.txt`` line, decoded, in parts of at most ``_READ_BYTES`` bytes read from
    ``f`` (``first`` is the first), the newline stripped."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    raw, held = first, ""
    while True:
        end = not raw or raw.endswith(b"\n") or len(raw) < _READ_BYTES
        try:
            text = held + decoder.decode(raw, final=end)
        except UnicodeDecodeError as e:
            raise CorpusError(f"line {number} of {path} is not UTF-8 ({e})") from None
        if end:
            yield text.rstrip("\r\n")
            return
        held = "\r" if text.endswith("\r") else ""  # may be half of the line's \r\n
        yield text[: len(text) - len(held)]
        raw = f.readline(_READ_BYTES)


def _pieces(parts: Iterator[str], size, f=None) -> Iterator[tuple[str, float, bool]]:
    """A document given as ``parts`` (strings that join to it) as pieces of at most
    ``PIECE_CHARS`` characters, each cut after a non-space that whitespace follows where
    there is one. ``size``: the fraction to report, or (with ``f``) the file size to
    divide ``f.tell()`` by. A blank document gives nothing."""
    buf, started, blank = "", False, []

    def fraction() -> float:
        return f.tell() / size if f is not None else size

    def emit(piece: str):
        nonlocal started
        if not piece:
            return
        if not started and not piece.strip():
            blank.append(piece)  # leading whitespace: kept only if text follows
            return
        for held in blank:
            yield held, fraction(), not started
            started = True
        blank.clear()
        yield piece, fraction(), not started
        started = True

    for part in parts:
        buf += part
        while len(buf) > PIECE_CHARS:
            cut = PIECE_CHARS
            for m in _CUT.finditer(buf, PIECE_CHARS // 2, PIECE_CHARS):
                cut = m.end()
            yield from emit(buf[:cut])
            buf = buf[cut:]
    yield from emit(buf)


def _encoded(corpus: Corpus, tokenizer: Tokenizer) -> Iterator[tuple[list[int], float, bool]]:
    """``(token ids, fraction, starts a document)`` of every piece, tokenized in batches of
    at most ``_ENCODE_BATCH`` pieces and ``_ENCODE_CHARS`` characters."""
    texts: list[str] = []
    meta: list[tuple[float, bool]] = []
    chars = 0

    def flush():
        encoded = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
        for enc, (fraction, start) in zip(encoded, meta, strict=True):
            yield enc.ids, fraction, start
        texts.clear()
        meta.clear()

    for text, fraction, start in corpus.documents():
        texts.append(text)
        meta.append((fraction, start))
        chars += len(text)
        if len(texts) == _ENCODE_BATCH or chars >= _ENCODE_CHARS:
            yield from flush()
            chars = 0
    if texts:
        yield from flush()
