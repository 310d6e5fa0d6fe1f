"""Checkpoints already found finite, so that loading one again does not read it all again.

``resid.load`` refuses NaN and Inf weights, and finding them means reading every byte of
the checkpoint: on a warm page cache that costs more than the rest of the load together
(SmolLM2-135M: about 65 ms of 120), and ``transformers`` never pays it (its load reads no
data at all until the first forward pass). So a load that finds a memory-mapped
safetensors checkpoint clean leaves a record of it, and a later load of the very same
files into the same dtype skips the value check (headers, names, shapes and sizes are
still checked every time).

Every family's conversion is a relayout (copies, transposes, fusing q/k/v; no arithmetic),
so what the check sees depends only on the files' bytes and the dtype: those are the key.
"The very same files" is the identity ``checkpoint.Stored.origin`` took from each file
when it was mapped: device, inode, size, modification and change times (ns). Writing to a
file sets its change time, and nothing but the system clock can set it back, so a file
edited or replaced since is not the same file and is checked again (git's index trusts the
same fields). A file changed less than ``MARGIN_NS`` before its load is not recorded: an
edit within the file system's timestamp granularity of the check could otherwise go
unseen. Tensors not read from a mapped file (pickles, GGUF, tensors in memory) are always
checked.

A record is one small file, ``$RESID_CACHE/checked/<sha256>`` (default
``~/.cache/resid/checked``), holding the identity it names; written atomically, never
required: where it cannot be read or written, the load checks values as before. Past
``MAX_RECORDS`` the oldest are removed, and only files that prove to be records (named by
the SHA-256 of their own text, which is a record's JSON).

>>> key = record_key(entries.values(), torch.float32)   # None: must be checked every time
>>> if key and is_known(key): ...                        # found finite before: skip
>>> remember(key)                                        # after a clean check
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from resid.core import files
from resid.io.checkpoint import Stored

VERSION = 1  # of what "checked" means; a new check makes older records unknown
MARGIN_NS = 2_000_000_000  # a file changed more recently than this is not recorded
MAX_RECORD_BYTES = 64 << 10
MAX_RECORDS = 1024


def folder() -> Path | None:
    """Where records live: ``$RESID_CACHE/checked``, else ``~/.cache/resid/checked`` (the
    cache root ``scripts/fetch_smollm2.py`` keeps the real model under); None (no records)
    where that is not an absolute path, e.g. with no home folder."""
    root = os.environ.get("RESID_CACHE")
    try:
        base = Path(root).expanduser() if root else Path.home() / ".cache" / "resid"
    except (RuntimeError, KeyError):  # no home folder to be found
        return None
    return base / "checked" if base.is_absolute() else None


def record_key(entries: Iterable[Stored], dtype: torch.dtype) -> str | None:
    """The record's text for these tensors converted to ``dtype``, or None when they cannot
    be recorded: one is not from a mapped file, or a file changed within ``MARGIN_NS``."""
    origins = set()
    for stored in entries:
        if stored.origin is None:
            return None
        origins.add(stored.origin)
    if not origins:
        return None
    now = time.time_ns()
    if any(max(o[3], o[4]) > now - MARGIN_NS for o in origins):
        return None
    return json.dumps({"version": VERSION, "dtype": str(dtype), "files": sorted(origins)})


def _path(key: str) -> Path | None:
    where = folder()
    return None if where is None else where / hashlib.sha256(key.encode()).hexdigest()


def is_known(key: str) -> bool:
    """True when a record of exactly ``key`` exists (a missing, unreadable or different
    file is not one)."""
    path = _path(key)
    try:
        return path is not None and files.read_regular(path, MAX_RECORD_BYTES).decode() == key
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def remember(key: str) -> None:
    """Record ``key`` (quietly nothing where the folder cannot be written)."""
    path = _path(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, key.encode(), durable=False)
        _prune(path.parent)
    except OSError:
        pass


def _record(path: Path) -> bool:
    """True when ``path`` is a record: its name is the SHA-256 of its text, a record's JSON."""
    try:
        text = files.read_regular(path, MAX_RECORD_BYTES)
        return (hashlib.sha256(text).hexdigest() == path.name
                and json.loads(text).get("version") is not None)  # fmt: skip
    except (OSError, ValueError, AttributeError):
        return False


def _prune(where: Path) -> None:
    """The oldest records removed while there are more than ``MAX_RECORDS`` (files that
    are not records are left alone and not counted)."""
    names = os.listdir(where)
    if len(names) <= MAX_RECORDS:
        return
    found = []
    for name in names:
        try:
            found.append((os.lstat(where / name).st_mtime_ns, name))
        except OSError:
            continue
    excess = len(found) - MAX_RECORDS
    for _, name in sorted(found):
        if excess <= 0:
            break
        if _record(where / name):
            os.unlink(where / name)
        excess -= 1  # removed, or not a record and so not counted


__all__ = ["MARGIN_NS", "folder", "is_known", "record_key", "remember"]
