"""Reading checkpoint files: every tensor known by its header before its data is read.

One reader for every layout resid loads: a folder (``model.safetensors``,
``pytorch_model.bin``, ``ckpt.pt``, or a sharded ``model.safetensors.index.json``), one
``.safetensors`` file, a PyTorch ``.bin`` (read with ``weights_only=True``: a pickle that
would run code is refused, never run) and nanoGPT's ``ckpt.pt``.

Safetensors headers are parsed and checked here (types, shapes, offsets against the file's
length) and the data is memory-mapped: a tensor's bytes are read only when it is converted,
one tensor at a time, and its pages are released from the mapping right after. Shard paths
are confined to their folder and to regular files; JSON files are size-limited.

>>> stored = read_weights(Path("model.safetensors"))    # name -> Stored, nothing read yet
>>> stored["wte.weight"].shape, stored["wte.weight"].dtype
((50257, 768), torch.float32)
>>> w = stored["wte.weight"].view()                      # a view of the mapped file
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from resid.io.errors import CheckpointError

MAX_JSON_BYTES = 16 << 20  # config.json, a shard index: far larger is not one
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (safetensors' own limit)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """One tensor of a checkpoint: its shape and dtype (from the header) and a way to
    get at its data. ``view()`` is the stored data itself (a view of a memory-mapped file
    where it can be); ``release(offset, nbytes)`` drops its pages (all, or that byte range
    of it) from memory once they have been copied.
    ``mapped``: the view is of a private (copy-on-write) mapping of a file, which a model
    may keep as its parameter without a copy; anything else is copied. ``origin``: the
    identity of that file when it was mapped (device, inode, size, modification and change
    times in ns: ``resid.io.checked``), None for tensors not read from a file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], Tensor]
    release: Callable[..., None] = lambda offset=0, nbytes=None: None
    mapped: bool = False
    origin: tuple[int, ...] | None = None

    def view(self) -> Tensor:
        """The stored data, without a copy where it can be (do not keep it: copy it)."""
        return self.fetch()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def transposed(self) -> Stored:
        """The same data, read as its transpose (nanoGPT's ``nn.Linear`` ``[out, in]``)."""
        return Stored(self.shape[::-1], self.dtype, lambda: self.fetch().T, self.release,
                      self.mapped, self.origin)  # fmt: skip

    @staticmethod
    def of(tensor: Tensor) -> Stored:
        """A tensor already in memory."""
        return Stored(tuple(tensor.shape), tensor.dtype, lambda: tensor)


class Weights(Mapping):
    """A checkpoint's tensors by name, read on demand: ``weights[name]`` is a copy in
    memory; ``weights.stored(name)`` its shape and dtype without reading it."""

    def __init__(self, entries: dict[str, Stored]):
        self._entries = entries

    def stored(self, name: str) -> Stored:
        return self._entries[name]

    def __getitem__(self, name: str) -> Tensor:
        s = self._entries[name]
        out = s.view().clone()
        s.release()
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


# ---- files ------------------------------------------------------------------------------


def require_regular(path: Path, what: str) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), which must be a regular file: a FIFO,
    a device or a socket would block or never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"the {what} {path} is not a regular file (a FIFO, device, socket or folder): "
            "resid reads checkpoints only from ordinary files"
        )
    return st


def read_json(path: Path, what: str):
    """A JSON file of at most ``MAX_JSON_BYTES``, any failure a ``CheckpointError``."""
    st = require_regular(path, what)
    if st.st_size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"the {what} {path} is {st.st_size:,} bytes: far too large to be one "
            f"(the limit is {MAX_JSON_BYTES:,})"
        )
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError, RecursionError) as e:
        raise CheckpointError(f"the {what} {path} is not valid JSON: {str(e)[:200]}") from e


def shard_path(folder: Path, shard: object, index: Path) -> Path:
    """``folder / shard``, refused unless it names a regular file inside ``folder`` (or, for a
    huggingface_hub snapshot, inside the cached repository its links point into)."""
    if not isinstance(shard, str) or not shard or "\x00" in shard:
        raise CheckpointError(f"{index} names the shard {shard!r}: not a file name")
    name = PurePosixPath(shard)
    if name.is_absolute() or os.path.isabs(shard):
        raise CheckpointError(
            f"{index} names the shard {shard!r}: shard names must be relative paths inside "
            "the checkpoint folder"
        )
    if ".." in name.parts or "\\" in shard:
        raise CheckpointError(
            f"{index} names the shard {shard!r}, outside the checkpoint folder: refused"
        )
    path = folder / shard
    real, root = path.resolve(), folder.resolve()
    roots = [root] + ([root.parent.parent] if root.parent.name == "snapshots" else [])
    if not any(real == r or r in real.parents for r in roots):
        raise CheckpointError(
            f"{index} names the shard {shard!r}, which resolves to {real}, outside the "
            "checkpoint folder: refused"
        )
    require_regular(path, "shard")
    return path


def read_index(index: Path, folder: Path) -> dict[str, Stored]:
    """The tensors of a sharded checkpoint: every shard its index names, each confined to
    ``folder`` and to regular files; a tensor stored in two shards is refused."""
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index} has no 'weight_map' of tensor names to shard file names")
    out: dict[str, Stored] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_weights(shard_path(folder, shard, index))
        if not all(isinstance(k, str) and isinstance(v, Stored) for k, v in part.items()):
            raise CheckpointError(f"{index}: the shard {shard!r} is not a state dict of tensors")
        twice = sorted(set(part) & set(out))
        if twice:
            raise CheckpointError(f"{index}: {', '.join(twice[:6])} stored in two shards")
        out |= part
    return out


# ---- safetensors ------------------------------------------------------------------------


def _layout(raw: bytes, n: int, size: int, bad) -> dict:
    """name -> (dtype, shape, first byte in the file, bytes) from a safetensors header."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"its header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise bad("its header is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise bad(f"{name!r} has no dtype")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise bad(f"{name!r} has the dtype {info['dtype']!r}, which resid does not read")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_index(d) for d in shape):
            raise bad(f"{name!r} has the shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_index, offsets)):
            raise bad(f"{name!r} has the data offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(
                f"{name!r}, a {shape} {info['dtype']} tensor, is said to lie at bytes "
                f"{begin}-{end} of {data_len:,}"
            )
        layout[name] = (dtype, tuple(shape), data_start + begin, end - begin)
    return layout


def read_safetensors(path: Path) -> dict[str, Stored]:
    """Every tensor of a ``.safetensors`` file, from its header (checked against the file's
    length), its data memory-mapped and read only when used."""
    require_regular(path, "checkpoint")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is not a readable safetensors file ({why}): is it truncated?"
        )

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # this descriptor's file, mapped below
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"a header of {n:,} bytes in a file of {size:,}")
        raw = f.read(n)
        layout = _layout(raw, n, size, bad)
        mapped = _Mapping(f, path) if any(nbytes for *_, nbytes in layout.values()) else None
    return {
        name: Stored(shape, dtype, mapped.fetcher(dtype, shape, start, nbytes),
                     mapped.releaser(start, nbytes), mapped=start % dtype.itemsize == 0,
                     origin=mapped.origin)
        if nbytes
        else Stored.of(torch.empty(shape, dtype=dtype))
        for name, (dtype, shape, start, nbytes) in layout.items()
    }  # fmt: skip


def _index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


class _Mapping:
    """A private, copy-on-write memory map of a whole file, made when its header is read
    (so a file replaced afterwards cannot be read with the old header's offsets)."""

    def __init__(self, f, path: Path):
        self.path = path
        try:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot map {path} into memory: {e}") from e
        st = os.fstat(f.fileno())  # the file mapped, as it was when mapped
        self.origin = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _open(self) -> mmap.mmap:
        return self.map

    def fetcher(self, dtype, shape, start: int, nbytes: int) -> Callable[[], Tensor]:
        def fetch() -> Tensor:
            m = self._open()
            if start % dtype.itemsize:  # unaligned: copy the bytes out first
                buffer = bytearray(m[start : start + nbytes])
                return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
            count = nbytes // dtype.itemsize
            return torch.frombuffer(m, dtype=dtype, count=count, offset=start).reshape(shape)

        return fetch

    def releaser(self, start: int, nbytes: int) -> Callable[..., None]:
        def release(offset: int = 0, length: int | None = None) -> None:
            if not hasattr(mmap, "MADV_DONTNEED"):
                return
            page = mmap.PAGESIZE
            begin = start + offset
            end = start + (nbytes if length is None else min(nbytes, offset + length))
            first, last = -(-begin // page) * page, end // page * page  # whole pages only
            if last > first:
                self.map.madvise(mmap.MADV_DONTNEED, first, last - first)

        return release


# ---- pickles ----------------------------------------------------------------------------


def read_pickle(path: Path) -> dict:
    """A PyTorch ``.bin`` / ``ckpt.pt`` as the dict it holds, read with
    ``weights_only=True`` and memory-mapped, every tensor's size checked against the file."""
    size = require_regular(path, "checkpoint").st_size
    mapped = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: its pickle holds Python objects other than tensors, and "
            "unpickling them could run arbitrary code. If you trust the file, convert it to "
            f"safetensors first. (torch said: {str(e).splitlines()[0] if str(e) else e!r})"
        ) from e
    except Exception as e:  # a text file, a truncated zip, …: torch raises many kinds
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle of "
            f"tensors): {str(e)[:300]}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = [v for v in obj.values() if isinstance(v, Tensor)]
    if isinstance(obj.get("model"), dict):  # nanoGPT
        tensors += [v for v in obj["model"].values() if isinstance(v, Tensor)]
    for t in tensors:
        if t.numel() * t.element_size() > size:
            raise CheckpointError(
                f"{path} declares a {list(t.shape)} {t.dtype} tensor, "
                f"{t.numel() * t.element_size():,} bytes, in a file of {size:,} bytes: it is corrupt"
            )
    return obj


def state_dict(obj: dict, path: Path) -> dict[str, Stored]:
    """A pickled dict as a state dict: string keys, tensor values."""
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict of tensors (nor a nanoGPT checkpoint with "
            f"'model_args' and 'model'): {', '.join(map(repr, bad[:6]))} "
            f"{'is not a tensor' if len(bad) == 1 else 'are not tensors'}"
        )
    return {k: Stored.of(v) for k, v in obj.items()}


def read_weights(path: Path) -> dict[str, Stored] | dict:
    """A weight file's tensors (``.safetensors``), or the dict a pickle holds (for the
    caller to tell a state dict from a nanoGPT checkpoint)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pickle(path)
    if "model_args" in obj and "model" in obj:
        return obj
    return state_dict(obj, path)


def read_folder(folder: Path) -> tuple[Path, dict]:
    """(the file read, what it holds) for a checkpoint folder, in the order transformers
    looks: one safetensors file, a ``.bin``, nanoGPT's ``ckpt.pt``, a sharded index."""
    for name in ("model.safetensors", "pytorch_model.bin", "ckpt.pt"):
        if (folder / name).is_file():
            return folder / name, read_weights(folder / name)
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        return index, read_index(index, folder)
    raise CheckpointError(
        f"{folder} holds no checkpoint: expected model.safetensors, pytorch_model.bin, "
        "a sharded model.safetensors.index.json, or a nanoGPT ckpt.pt"
    )


def stored_of(weights: Mapping[str, Tensor], source: str) -> dict[str, Stored]:
    """Tensors handed in by a caller (``from_hf``) as ``Stored`` entries, never modified."""
    out = {}
    for k, v in weights.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{source}: {k!r} is not a tensor named by a string")
        out[k] = Stored.of(v)
    return out


__all__ = [
    "MAX_JSON_BYTES",
    "Stored",
    "Weights",
    "read_folder",
    "read_index",
    "read_json",
    "read_pickle",
    "read_safetensors",
    "read_weights",
    "require_regular",
    "shard_path",
    "state_dict",
    "stored_of",
]
