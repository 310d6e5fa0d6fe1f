"""The harvest folder format: the one writer and the one reader of a harvest on disk.

A harvest folder holds

- ``resid-manifest.json``: ``{"writer": "resid harvest", "files": {path: sha256},
  "harvest": record}``, the record being the :class:`~resid.harvest.settings.Settings`, the
  run's identity (model, corpus and their fingerprints, ``run_id``, ``world_size``) and its
  ``status`` (``"running"`` or ``"complete"``; a complete one adds ``tokens``, ``shards``
  and ``site_info``);
- ``shards/NNNNNN.safetensors`` (``--activations``): one tensor per site ``[rows, units]``
  plus ``tokens`` and ``index``;
- ``stats/SITE.safetensors``: a site's statistics (:func:`load_stats`);
- ``ranks/R.safetensors`` while running: rank R's committed state.

Every file is written whole (:func:`resid.core.files.atomic_write`). Readers check the
manifest's record (types and ranges, as the command line is checked), confine every path
it names to the folder, read only regular files of a bounded size, and check each file
against its SHA-256 before using it. The dashboard and the activation store read through
here.

>>> info = read_harvest("h"); info["tokens"]
>>> load_stats("h", "blocks.5.mlp.hook_post")["max"]     # [units]
>>> for shard in iter_shards("h"): shard["blocks.5.mlp.hook_post"]   # [rows, units]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import safetensors
import safetensors.torch
from torch import Tensor

from resid.core import files
from resid.harvest.errors import HarvestError
from resid.harvest.settings import Settings
from resid.harvest.stats import N_BINS

WRITER = "resid harvest"
VERSION = 1
SUBFOLDERS = ("shards", "ranks", "stats")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
MAX_SHARDS = 1 << 24
MAX_UNITS = 1 << 31
_SHARD = re.compile(r"shards/\d{6,}\.safetensors")
_RANK = re.compile(r"ranks/\d{1,6}\.safetensors")
_STATS = re.compile(r"stats/[^/]+\.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SLACK = 1 << 20  # bytes of header allowed beyond the tensors' own


def shard_path(chunk: int) -> str:
    """The relative path of chunk ``chunk``'s activations."""
    return f"shards/{chunk:06d}.safetensors"


def stats_path(site: str) -> str:
    """The relative path of ``site``'s statistics."""
    return files.check_relpath(f"stats/{site}.safetensors", "a site's statistics path")


def rank_path(rank: int) -> str:
    """The relative path of rank ``rank``'s committed running state."""
    return f"ranks/{rank}.safetensors"


def _ours(rel: str) -> bool:
    return bool(_SHARD.fullmatch(rel) or _RANK.fullmatch(rel) or _STATS.fullmatch(rel))


# ---- writing --------------------------------------------------------------------------------


def save_tensors(
    folder: Path, rel: str, tensors: dict[str, Tensor], meta: dict[str, str], durable: bool = False
) -> str:
    """Write ``tensors`` (with string ``meta``) to ``folder/rel`` as safetensors, whole or
    not at all, through a temporary resid can recognise; returns the file's SHA-256.

    A killed process leaves the old file or the new one either way; ``durable`` also
    fsyncs, for a power cut (the final statistics; not each chunk's shard and state, where
    an fsync a chunk would cost more than the forward on a shared filesystem).

    >>> save_tensors(Path("h"), "stats/blocks.0.hook_resid_post.safetensors", t, {}, True)
    """
    data = safetensors.torch.save(tensors, metadata=meta)
    return files.atomic_write(files.inside(folder, rel), data, durable=durable)


def write_manifest(folder: Path, record: dict, listed: dict[str, str]) -> None:
    """Write the manifest: ``record`` under ``harvest``, ``listed`` (path -> SHA-256)."""
    files.put_manifest(folder, WRITER, listed, harvest=record)


# ---- reading what a run left -------------------------------------------------------------


def read_meta(path: Path) -> dict[str, str] | None:
    """The string metadata of the safetensors file ``path`` (a regular file; only its
    header is read, at most ``MAX_HEADER_BYTES``), or None if it is not one."""
    try:
        fd, st = files.open_regular(path)
    except (OSError, ValueError):
        return None
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, st.st_size - 8):
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return None
    return meta


def read_manifest(folder: Path) -> dict | None:
    """``folder``'s manifest if resid harvest wrote it (paths checked by
    :func:`resid.core.files.read_manifest`), else None."""
    manifest = files.read_manifest(folder)
    if (
        manifest is None
        or manifest.get("writer") != WRITER
        or not isinstance(manifest.get("harvest"), dict)
    ):
        return None
    return manifest


def rank_state(folder: Path, rel: str, run_id: str) -> dict | None:
    """What rank state ``rel`` says it committed (``done`` chunks, ``shards``, ``files``
    with their digests, ``tokens``) if it is this run's, else None; damaged state is a
    :class:`HarvestError`."""
    meta = read_meta(folder / rel)
    if not meta or meta.get("run_id") != run_id or meta.get("writer") != WRITER:
        return None
    try:
        state = {
            "done": json.loads(meta["done"]),
            "shards": json.loads(meta["shards"]),
            "files": json.loads(meta["files"]),
            "tokens": int(meta["tokens"]),
        }
        ok = (
            isinstance(state["done"], list)
            and all(isinstance(c, int) and c >= 0 for c in state["done"])
            and isinstance(state["files"], dict)
            and all(_SHARD.fullmatch(str(k)) and _HEX64.fullmatch(str(v))
                    for k, v in state["files"].items())
            and isinstance(state["shards"], dict)
            and all(_SHARD.fullmatch(str(k)) and isinstance(v, dict)
                    and isinstance(v.get("chunk"), int) and isinstance(v.get("rows"), int)
                    and v.get("sha256") == state["files"].get(k)
                    for k, v in state["shards"].items())
            and state["tokens"] >= 0
        )  # fmt: skip
    except (KeyError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise HarvestError(
            f"{folder / rel} is this run's state but damaged: the run cannot resume exactly; "
            "harvest to a new folder"
        )
    return state


def foreign_files(folder: Path) -> list[str]:
    """What in a harvest folder resid cannot prove this harvest wrote: not listed with its
    hash in the manifest or a rank's committed state, not a shard, statistics or rank file
    tagged with this run's id, and not one of resid's own temporaries."""
    if not folder.exists():
        return []
    found = list(files.entries(folder))
    if not found:
        return []
    manifest = read_manifest(folder)
    if manifest is None:
        return [rel for rel, _ in found] if found else []
    run = manifest["harvest"].get("run_id")
    proven: dict[str, str | None] = dict(manifest["files"])
    for rel, st in found:
        if _RANK.fullmatch(rel) and stat.S_ISREG(st.st_mode):
            state = rank_state(folder, rel, run)
            if state is not None:
                proven[rel] = None
                proven.update(state["files"])
    foreign = []
    for rel, st in found:
        if stat.S_ISDIR(st.st_mode):
            if rel not in SUBFOLDERS:
                foreign.append(rel + "/")
            continue
        if rel == files.MANIFEST:
            continue
        if not stat.S_ISREG(st.st_mode):
            foreign.append(rel)
        elif _temporary_of(rel) is not None:
            continue  # resid's own, left by a kill: removed on resume
        elif rel in proven:
            if proven[rel] is not None and files.sha256(folder / rel) != proven[rel]:
                foreign.append(f"{rel} (changed since resid wrote it)")
        elif not (_ours(rel) and (read_meta(folder / rel) or {}).get("run_id") == run):
            foreign.append(rel)
        # else: committed by its rank before the rank's state: redone on resume
    return foreign


def _temporary_of(rel: str) -> str | None:
    """The harvest file a temporary at ``rel`` was becoming (None: not a temporary)."""
    head, _, name = rel.rpartition("/")
    real = files.is_temp(name)
    if real is None and name.endswith(".partial"):  # resid 0.x's fixed temporary names
        real = name[: -len(".partial")]
    if real is None:
        return None
    target = f"{head}/{real}" if head else real
    return target if _ours(target) or target == files.MANIFEST else None


def only_a_first_manifest(folder: Path) -> bool:
    """True when ``folder`` holds nothing but temporaries of its manifest: a run killed
    while writing its first manifest, before anything else existed."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    found = list(files.entries(folder))
    return bool(found) and all(
        stat.S_ISREG(st.st_mode) and _temporary_of(rel) == files.MANIFEST for rel, st in found
    )


def remove_temporaries(folder: Path) -> None:
    """Delete resid's own temporaries a kill left in a harvest folder (regular files named
    as :func:`resid.core.files.atomic_write` names them, in the harvest's own places)."""
    for rel, st in list(files.entries(folder)):
        if stat.S_ISREG(st.st_mode) and _temporary_of(rel) is not None:
            files.inside(folder, rel).unlink(missing_ok=True)


def cleanup_ranks(folder: Path, run_id: str) -> None:
    """Remove the ranks' working state once the manifest is final (only files whose
    content proves them this run's)."""
    ranks = folder / "ranks"
    if not ranks.is_dir() or ranks.is_symlink():
        return
    for rel, st in list(files.entries(folder)):
        if _RANK.fullmatch(rel) and stat.S_ISREG(st.st_mode):
            meta = read_meta(folder / rel)
            if meta and meta.get("run_id") == run_id and meta.get("writer") == WRITER:
                files.inside(folder, rel).unlink()
    try:
        ranks.rmdir()
    except OSError:
        pass


# ---- reading a finished harvest ------------------------------------------------------------


def _check_complete(info: dict, listed: dict[str, str], folder: Path) -> None:
    """Check a complete record's shape: settings, tokens, shards and site_info, and that
    every file it names is listed in the manifest."""
    where = f"the manifest of {folder}"
    settings = Settings.from_record(info, where)

    def bad(what: str) -> HarvestError:
        return HarvestError(f"{where} is damaged: {what}; harvest again to a new folder")

    tokens = info.get("tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise bad(f"tokens is {tokens!r}")
    if not isinstance(info.get("model", ""), str):
        raise bad(f"model is {info.get('model')!r}")
    shards = info.get("shards")
    if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
        raise bad("shards is not a list")
    for i, s in enumerate(shards):
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("path"), str)
            or s["path"] != shard_path(i)
            or s["path"] not in listed
            or not isinstance(s.get("rows"), int)
            or isinstance(s.get("rows"), bool)
            or s["rows"] < 0
        ):
            raise bad(f"shard entry {i} is {str(s)[:120]}")
    if settings.activations != bool(shards):
        raise bad("its shards do not match its activations setting")
    site_info = info.get("site_info")
    if not isinstance(site_info, dict) or set(site_info) != (
        set(settings.sites) if settings.stats else set()
    ):
        raise bad(f"site_info does not list the sites {list(settings.sites)}")
    for site, entry in site_info.items():
        units = entry.get("units") if isinstance(entry, dict) else None
        if not isinstance(units, int) or isinstance(units, bool) or not 1 <= units <= MAX_UNITS:
            raise bad(f"site_info[{site!r}] is {str(entry)[:120]}")
        if entry.get("stats") != stats_path(site) or entry["stats"] not in listed:
            raise bad(f"site_info[{site!r}] names {entry.get('stats')!r}")


def read_harvest(folder: str | Path) -> dict:
    """The manifest's ``harvest`` record of a finished harvest (settings, sites, tokens,
    shards, site_info), checked to be complete and well formed.

    >>> read_harvest("h")["tokens"]
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise HarvestError(
            f"{folder} is not a resid harvest folder (no {files.MANIFEST} from resid harvest)"
        )
    info = manifest["harvest"]
    if info.get("status") != "complete":
        raise HarvestError(
            f"{folder} holds an unfinished harvest: finish it with resid harvest --resume"
        )
    _check_complete(info, manifest["files"], folder)
    return info


def read_activations(folder: str | Path, sites: list[str] | tuple[str, ...]) -> dict:
    """``read_harvest``'s record of a harvest that stored activations at every one of
    ``sites`` (what the activation store and the training streams read), or a HarvestError
    naming what is missing.

    >>> read_activations("harvests/run1", ["blocks.6.hook_resid_pre"])["tokens"]
    """
    info = read_harvest(folder)
    if not info.get("activations"):
        raise HarvestError(
            f"{folder} holds no activations: harvest again with activations=True "
            "(resid harvest --activations) to stream them"
        )
    for site in sites:
        if site not in info["sites"]:
            raise HarvestError(f"{folder} has no activations at {site!r}; it has {info['sites']}")
    return info


def read_listed(folder: Path, rel: str, listed: dict[str, str], max_bytes: int) -> dict:
    """The tensors of the listed file ``folder/rel``: confined to the folder, a regular
    file of at most ``max_bytes``, matching its SHA-256, read once."""
    try:
        data = files.read_regular(files.inside(folder, rel), max_bytes)
    except FileNotFoundError:
        raise HarvestError(f"{folder / rel} is missing: harvest again") from None
    except (OSError, ValueError) as e:
        raise HarvestError(f"cannot read {rel} of the harvest {folder}: {e}") from None
    if hashlib.sha256(data).hexdigest() != listed.get(rel):
        raise HarvestError(f"{folder / rel} changed since resid harvest wrote it")
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors' own error types
        raise HarvestError(f"{folder / rel} is not a safetensors file: {e}") from None


def _stats_bytes(units: int, k: int, w: int) -> int:
    return units * (8 * 5 + 4 * 2 + 8 * N_BINS + k * (4 + 8 + w * 12)) + 8 * N_BINS + _SLACK


def load_stats(folder: str | Path, site: str) -> dict[str, Tensor]:
    """A finished harvest's statistics at ``site``: ``count`` [1]; per unit ``mean``,
    ``var``, ``m2``, ``min``, ``max``, ``active``, ``frac_active``, ``hist`` [units, 195]
    (bins between ``edges``, see ``resid.harvest.stats.default_edges``);
    ``top_values``/``top_index`` [units, k] (NaN/-1 where fewer than k tokens), and
    ``top_tokens``/``top_acts`` [units, k, window] (-1/NaN outside the context).

    >>> s = load_stats("harvest", "blocks.5.mlp.hook_post"); s["max"].argmax()
    """
    folder = Path(folder)
    info = read_harvest(folder)
    if site not in info["site_info"]:
        raise HarvestError(
            f"{folder} has no statistics for {site!r}; it has {list(info['site_info'])}"
        )
    units, k = info["site_info"][site]["units"], info["k"]
    w = sum(info["window"]) + 1
    listed = read_manifest(folder)["files"]
    st = read_listed(folder, stats_path(site), listed, _stats_bytes(units, k, w))
    shapes = {"count": (1,), "mean": (units,), "var": (units,), "max": (units,),
              "min": (units,), "frac_active": (units,), "hist": (units, N_BINS),
              "top_values": (units, k), "top_index": (units, k), "top_tokens": (units, k, w),
              "top_acts": (units, k, w)}  # fmt: skip
    for name, shape in shapes.items():
        if name not in st or tuple(st[name].shape) != shape:
            got = tuple(st[name].shape) if name in st else "missing"
            raise HarvestError(
                f"{folder / stats_path(site)} does not match its manifest: {name} is {got}, "
                f"not {shape} (units {units}, k {k}, window {info['window']})"
            )
    return st


def load_shard(folder: Path, rel: str, listed: dict[str, str], max_bytes: int = 1 << 40) -> dict:
    """One shard's tensors (checked as :func:`read_listed` checks)."""
    return read_listed(folder, rel, listed, max_bytes)


def iter_shards(folder: str | Path) -> Iterator[dict[str, Tensor]]:
    """Each shard of a finished harvest, in corpus order, checked against its hash.

    >>> rows = torch.cat([s["blocks.5.mlp.hook_post"] for s in iter_shards("h")])
    """
    folder = Path(folder)
    info = read_harvest(folder)
    listed = read_manifest(folder)["files"]
    for shard in info["shards"]:
        yield load_shard(folder, shard["path"], listed)
