"""SAEs on disk, in SAELens' format: a folder holding ``cfg.json`` and
``sae_weights.safetensors``, on the local disk or in a Hugging Face repo.

Reading checks before it allocates: the config is a bounded, regular file whose every
field is type- and range-checked (``resid.sae.config``); the weights file's header is read
first and every tensor's name, shape and dtype compared with the config; the weights must
be finite. Paths stay inside their folder (an ``sae_id`` cannot climb out of it).

Writing is owned and atomic, as ``resid.save`` is (``resid.core.files.replace_folder``):
the folder is written whole beside its target with a ``resid-manifest.json`` and swapped
in, so a kill at any instant leaves the previous SAE or the new one; a folder resid did
not write is refused, never overwritten.

>>> sae = resid.sae.load("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")
>>> resid.sae.save(sae, "checkpoints/my-sae")
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from resid.core import files
from resid.sae.config import MAX_CFG_BYTES, SAEConfig, SAEError, parse_json, show
from resid.sae.module import SAE

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
WRITER = "resid.sae.save"
# Hugging Face's repo id rules: owner/name, letters, digits, '-', '_', '.', no '--' or
# '..', not starting or ending with '-' or '.', at most 96 characters each
_REPO_PART = r"(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")


def load(
    path_or_repo: str | Path,
    sae_id: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SAE:
    """An SAE from SAELens' files: a folder with ``cfg.json`` and
    ``sae_weights.safetensors``, or a Hugging Face repo id with the SAE's folder in it
    (``sae_id``), fetched through huggingface_hub's cache (``HF_HUB_OFFLINE=1`` works).

    The config is type- and range-checked, and every tensor's name, shape and dtype against
    it, before any weight is read; weights must be finite. Every problem is an
    :class:`SAEError` that names it.

    >>> sae = resid.sae.load("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")
    >>> sae = resid.sae.load("checkpoints/my-sae", device="cuda")
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a float torch.dtype, not {dtype!r}")
    folder, root = locate(path_or_repo, sae_id)
    cfg_path = _regular(folder / CFG_FILE, root, "config")
    weights_path = _regular(folder / WEIGHTS_FILE, root, "weights")
    try:
        text = files.read_regular(cfg_path, MAX_CFG_BYTES)
    except (OSError, ValueError) as e:
        raise SAEError(f"cannot read {folder / CFG_FILE}: {e}") from None
    cfg = SAEConfig.from_dict(parse_json(text, str(folder / CFG_FILE)), str(folder / CFG_FILE))
    weights = _read_weights(weights_path, cfg, folder / WEIGHTS_FILE)
    sae = SAE(cfg)
    with torch.no_grad():
        for name, t in weights.items():
            getattr(sae, name).copy_(t)
    if dtype is not None:
        sae = sae.to(dtype)
        sae.cfg = replace(cfg, dtype=str(dtype).removeprefix("torch."))
    return sae.to(device) if device is not None else sae


def _regular(path: Path, root: Path, what: str) -> Path:
    """``path`` resolved, if it is a regular file inside ``root`` (the hub cache links
    each file to a blob of the same repo), else an :class:`SAEError`."""
    real = Path(os.path.realpath(path))
    base = os.path.realpath(root)
    try:
        st = os.stat(real)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise SAEError(
            f"{path.parent} has no {path.name} (the SAE's {what}): an SAELens SAE folder holds "
            f"{CFG_FILE} and {WEIGHTS_FILE}, as regular files"
        )
    if os.path.commonpath([str(real), base]) != base:
        raise SAEError(f"{path} leads outside {root}: resid reads an SAE's files from its folder")
    return real


def locate(path_or_repo: str | Path, sae_id: str | None = None) -> tuple[Path, Path]:
    """(the SAE's folder, the folder its files must stay inside): a local folder (with
    ``sae_id``, the subfolder of that name), or a Hugging Face repo id whose ``sae_id``
    subfolder is fetched through huggingface_hub's cache.

    >>> locate("checkpoints", "blocks.6.hook_resid_pre")[0]
    PosixPath('checkpoints/blocks.6.hook_resid_pre')
    """
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise TypeError(f"give a folder or a Hugging Face repo id, not {show(path_or_repo)}")
    if sae_id is not None:
        if not isinstance(sae_id, str):
            raise TypeError(f"sae_id must be a string, not {show(sae_id)}")
        try:
            sae_id = files.check_relpath(sae_id.rstrip("/"), "the SAE id")
        except files.UnsafePathError as e:
            raise SAEError(
                f"{e}: give the SAE's subfolder, e.g. 'blocks.8.hook_resid_pre'"
            ) from None
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        if sae_id is None:
            return path, path
        try:
            return files.inside(path, sae_id, "the SAE id"), path
        except files.UnsafePathError as e:
            raise SAEError(str(e)) from None
    repo = str(path_or_repo)
    if sae_id is None or not _REPO_ID.fullmatch(repo):
        raise SAEError(
            f"'{repo}' is not a folder"
            + ("" if sae_id is None else " nor a Hugging Face repo id (owner/name)")
            + f": give the folder holding {CFG_FILE} and {WEIGHTS_FILE}, or a Hugging Face "
            "repo id and the SAE's id in it"
        )
    return _from_hub(repo, sae_id)


def _from_hub(repo: str, sub: str) -> tuple[Path, Path]:
    try:
        import huggingface_hub  # only hub names need it
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise SAEError(f"'{repo}' is a Hugging Face repo id: pip install huggingface_hub") from None
    try:
        root = huggingface_hub.snapshot_download(
            repo, allow_patterns=[f"{sub}/{CFG_FILE}", f"{sub}/{WEIGHTS_FILE}"]
        )
    except (OSError, ValueError, HfHubHTTPError) as e:
        raise SAEError(
            f"could not get the SAE '{sub}' of '{repo}' from the Hugging Face hub, and no copy "
            f"is in the local cache ({type(e).__name__}). Download it once with a network "
            "(unset HF_HUB_OFFLINE), or pass the path of a local SAE folder."
        ) from e
    snapshot = Path(root)
    return snapshot / sub, snapshot.parent.parent  # models--owner--name: snapshots and blobs


def _read_weights(path: Path, cfg: SAEConfig, shown: Path) -> dict[str, Tensor]:
    want = cfg.shapes()
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            extra = keys - set(want)
            if "scaling_factor" in extra:  # SAELens < 6 wrote ones here
                if shapes["scaling_factor"] != (cfg.d_sae,):
                    raise SAEError(f"{shown}: scaling_factor is {shapes['scaling_factor']}")
                sf = f.get_tensor("scaling_factor")
                if not torch.all(sf == 1):
                    raise SAEError(
                        f"{shown} has a scaling_factor that is not all ones (SAELens' old "
                        "fine-tuning scale), which resid does not apply: fold it into W_dec"
                    )
                extra.discard("scaling_factor")
            missing = sorted(set(want) - keys)
            if missing or extra:
                found = [f"missing {', '.join(missing)}" if missing else ""]
                names = ", ".join(k[:60] for k in sorted(extra)[:8]) + (
                    " …" if len(extra) > 8 else ""
                )
                found.append(f"unexpected {names}" if extra else "")
                raise SAEError(
                    f"{shown} does not match its {cfg.architecture} config: "
                    + "; ".join(s for s in found if s)
                    + f". A {cfg.architecture} SAE holds {', '.join(want)}"
                )
            bad = [f"{k} {shapes[k]} (want {s})" for k, s in want.items() if shapes[k] != s]
            if bad:
                raise SAEError(
                    f"{shown}: tensors of the wrong shape for d_in={cfg.d_in}, "
                    f"d_sae={cfg.d_sae}: " + ", ".join(bad)
                )
            not_float = [k for k in want if not dtypes[k].startswith(("F", "BF"))]
            if not_float:
                raise SAEError(f"{shown}: {', '.join(not_float)} must hold floats")
            out = {k: f.get_tensor(k).to(cfg.torch_dtype) for k in want}
    except SAEError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise SAEError(f"{shown} is not a safetensors file SAELens wrote: {e}") from None
    bad = [k for k, t in out.items() if not torch.isfinite(t).all()]
    if bad:
        raise SAEError(f"{shown}: {', '.join(bad)} hold NaN or infinite values: the SAE is broken")
    return out


def save(sae: SAE, folder: str | Path) -> Path:
    """Write ``sae`` in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``, and
    resid's ``resid-manifest.json``) as the folder ``folder``, whole or not at all.

    An existing ``folder`` is replaced only when it is empty or an earlier
    ``resid.sae.save`` wrote it (every file listed in its manifest, unchanged); anything
    else raises ``ForeignFilesError`` naming the files, and nothing is written. A kill at
    any instant leaves the previous folder or the new one.

    >>> resid.sae.save(sae, "checkpoints/my-sae")
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"resid.sae.save writes an SAE, not {type(sae).__name__}")
    tensors = {k: getattr(sae, k).detach().cpu().contiguous() for k in sae.cfg.shapes()}
    cfg = dict(sae.cfg.to_dict(), dtype=str(sae.W_enc.dtype).removeprefix("torch."))
    text = _dump(cfg)
    with files.replace_folder(folder, WRITER, "folder", durable=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(text, encoding="utf-8")
    return files.target(folder)


def _dump(cfg: dict) -> str:
    """``cfg`` as JSON text, or an :class:`SAEError` for metadata that is not JSON."""
    try:
        return json.dumps(cfg, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        raise SAEError(f"the SAE's config cannot be written as JSON: {e}") from None
