"""The results folder of a dataset sweep: its one writer and its one reader.

A folder holds

- ``resid-manifest.json``: ``{"writer": "resid dataset sweep", "files": {path: sha256},
  "job": identity, "chunks": n, "status": "running" | "complete"}``;
- ``chunks/NNNNNN.safetensors``: chunk ``c``'s per-item results, ``values [n, ...]``,
  ``baselines [n]``, ``rows [n]`` (prompts in each item) and ``digest`` (SHA-256 of the
  items' tokens, so a resumed run checks that it is given the same data).

Every file is written whole (:func:`resid.core.files.atomic_write`), the chunk before the
manifest that lists it, so a kill at any instant leaves the chunks listed so far; a chunk
written but not yet listed carries this writer's mark in its metadata and is the only file
a resumed run replaces. Reading checks the manifest's types and ranges, confines paths to
the folder, reads only regular files of bounded size, and checks each against its hash.

>>> store = Store("runs/ioi", identity, resume=True); store.done    # chunks already written
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from resid.core import files

WRITER = "resid dataset sweep"
MAX_CHUNKS = 1 << 24
MAX_CHUNK_BYTES = 1 << 31
_CHUNK = re.compile(r"chunks/\d{6,}\.safetensors")


class DatasetError(ValueError):
    """A dataset sweep that cannot start, resume or go on; the message names the fix."""


def chunk_path(chunk: int) -> str:
    """The relative path of chunk ``chunk``'s results."""
    return f"chunks/{chunk:06d}.safetensors"


class Store:
    """The results folder ``out`` of the job described by ``identity`` (JSON-able). New
    (``resume=False``): the folder must not exist or be empty. Resumed: it must be this
    writer's, for the same job; ``done`` is the number of chunks already written."""

    def __init__(self, out: str | Path, identity: dict, resume: bool):
        self.out, self.identity = files.target(out), json.loads(json.dumps(identity))
        self.files: dict[str, str] = {}
        self.done = 0
        self.result: dict | None = None  # the result's axes, labels and site (JSON)
        if resume and self.out.exists():
            self._open()
        elif self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise DatasetError(
                f"{self.out} exists and is not empty: pass resume=True (--resume) to continue "
                "the sweep written there, or choose a new folder"
            )

    def _open(self) -> None:
        manifest = files.read_manifest(self.out)
        if manifest is None or manifest.get("writer") != WRITER:
            raise DatasetError(
                f"{self.out} is not a dataset sweep's results folder (no {files.MANIFEST} "
                f"written by {WRITER!r}): choose another folder"
            )
        if manifest.get("job") != self.identity:
            raise DatasetError(
                f"{self.out} holds another sweep ({manifest.get('job')!r}), not this one "
                f"({self.identity!r}): resume with the same settings, or choose a new folder"
            )
        n = manifest.get("chunks")
        listed = manifest["files"]
        if not isinstance(n, int) or not 0 <= n <= MAX_CHUNKS:
            raise DatasetError(f"{self.out}: the manifest's chunk count {n!r} is not valid")
        if sorted(listed) != [chunk_path(c) for c in range(n)]:
            raise DatasetError(
                f"{self.out}: the manifest lists {sorted(listed)[:4]}…, not chunks 0..{n - 1}"
            )
        result = manifest.get("result")
        if n and not _result_ok(result):
            raise DatasetError(f"{self.out}: the manifest's result description is not valid")
        self.files, self.done, self.result = dict(listed), n, result

    def read(self, chunk: int) -> dict[str, Tensor]:
        """Chunk ``chunk``'s tensors, checked against the manifest's hash."""
        rel = chunk_path(chunk)
        if rel not in self.files:
            raise DatasetError(f"{self.out}: chunk {chunk} is not listed in the manifest")
        path = files.inside(self.out, rel)
        data = files.read_regular(path, MAX_CHUNK_BYTES)
        if hashlib.sha256(data).hexdigest() != self.files[rel]:
            raise DatasetError(f"{path} changed since it was written: start a new sweep")
        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:
            raise DatasetError(f"{path} is not a safetensors file: {e}") from e
        want = {"values", "baselines", "rows", "digest"}
        n = len(tensors.get("rows", ()))
        dtypes = {"values": torch.float32, "baselines": torch.float32, "rows": torch.int64,
                  "digest": torch.uint8}  # fmt: skip
        if (
            set(tensors) != want
            or any(tensors[k].dtype != d for k, d in dtypes.items())
            or any(len(tensors[k]) != n for k in ("values", "baselines"))
            or list(tensors["values"].shape[1:]) != (self.result or {}).get("shape")
        ):
            raise DatasetError(f"{path} does not hold a chunk's results ({sorted(tensors)})")
        return tensors

    def write(self, chunk: int, tensors: dict[str, Tensor], result: dict) -> None:
        """Write chunk ``chunk`` (the next one), then the manifest that lists it and
        ``result`` (the axes, labels and site of every item's result)."""
        if chunk != self.done:
            raise DatasetError(f"chunk {chunk} written after {self.done} chunks")
        rel = chunk_path(chunk)
        (self.out / "chunks").mkdir(parents=True, exist_ok=True)
        path = self.out / rel
        if path.exists() or path.is_symlink():
            self._check_ours(path)
        data = safetensors.torch.save(
            {k: v.contiguous() for k, v in tensors.items()}, metadata={"writer": WRITER}
        )
        self.files[rel] = files.atomic_write(path, data, durable=False)
        self.done, self.result = chunk + 1, result
        self._manifest("running")

    def finish(self) -> None:
        """Mark the sweep complete (every chunk written)."""
        self._manifest("complete")

    def _manifest(self, status: str) -> None:
        files.put_manifest(self.out, WRITER, self.files, job=self.identity, chunks=self.done,
                           status=status, result=self.result)  # fmt: skip

    def _check_ours(self, path: Path) -> None:
        """Refuse to replace a file this writer did not write (one written just before a
        kill, not yet listed, carries the writer's mark)."""
        try:
            checked = files.inside(self.out, chunk_path(self.done))
            files.read_regular(checked, MAX_CHUNK_BYTES)  # a regular file, of bounded size
            with safetensors.safe_open(str(checked), "pt") as f:
                mine = (f.metadata() or {}).get("writer") == WRITER
        except Exception:
            mine = False
        if not mine:
            raise DatasetError(
                f"{path} exists and was not written by this sweep: move it, or choose a new folder"
            )


def _result_ok(result) -> bool:
    """``{"axes": [str], "shape": [int], "names": {str: [str]}, "site": str | None}``."""
    if not isinstance(result, dict) or set(result) != {"axes", "shape", "names", "site"}:
        return False
    axes, names, site, shape = result["axes"], result["names"], result["site"], result["shape"]
    return (
        isinstance(axes, list)
        and isinstance(shape, list)
        and len(shape) == len(axes)
        and all(type(n) is int and 0 <= n <= 1 << 31 for n in shape)
        and all(isinstance(a, str) for a in axes)
        and isinstance(names, dict)
        and all(
            k in axes and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in names.items()
        )
        and (site is None or isinstance(site, str))
    )


def digest(tensors: list[Tensor]) -> Tensor:
    """SHA-256 of the tensors' bytes, as 32 uint8s (what a chunk records of its items)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
