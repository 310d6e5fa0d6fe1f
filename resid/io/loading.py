"""Loading and saving checkpoints: hub names, Hugging Face folders, single weight files,
nanoGPT, GGUF.

>>> model = resid.load("gpt2")                          # hub (its cache; HF_HUB_OFFLINE works)
>>> model = resid.load("path/to/hf-folder")             # config.json + model.safetensors / .bin
>>> model = resid.load("model.safetensors")             # one file (config.json beside it, if any)
>>> model = resid.load("out/ckpt.pt")                   # nanoGPT: model_args + model
>>> model = resid.load("model.gguf")                    # GGUF (resid.io.gguf)

Files are read by ``resid.io.checkpoint`` (headers first, data memory-mapped), each family's
config and names come from ``resid.io.families``, and the model is built by
``resid.io.convert`` one tensor at a time, straight into the dtype asked for. Nothing is
allocated before it is checked: config values are type- and range-checked, the number of
blocks against the weights actually present, shard paths confined to their folder (regular
files only), every tensor's size against its file; non-finite and non-float weights are
refused. Every failure is a ``CheckpointError`` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from resid.core import files
from resid.core.config import Config
from resid.core.devices import DeviceMap
from resid.core.model import Model
from resid.core.tokenizer import Tokenizer
from resid.io import checkpoint, families
from resid.io.checkpoint import Weights, read_folder, read_json, read_weights, require_regular
from resid.io.convert import build_model, from_hf
from resid.io.errors import CheckpointError
from resid.io.families import gpt2, nanogpt
from resid.io.families.assemble import check, normalise
from resid.io.families.common import Family
from resid.io.families.gpt2 import GPT2_VOCAB, to_gpt2_state_dict

try:  # GGUF files need the gguf extra (pip install 'resid[gguf]')
    from resid.io import gguf
except ImportError as e:
    if e.name != "gguf":
        raise
    gguf = None

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt"]  # fmt: skip
WRITER = "resid.save"
STAND_IN = "python scripts/make_tiny_gpt2.py"
MAX_TOKENIZER_BYTES = 256 << 20  # the largest tokenizers (Gemma's, 256k tokens) are ~35 MB
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json")


@dataclass
class Checkpoint:
    """A checkpoint as read from disk, before a model is built from it: its tensors (names
    without the base-model prefix, read on demand), its config and family."""

    weights: Weights  # GPT-2 names and Conv1D layout for GPT-2 and nanoGPT
    config: Config
    folder: Path | None  # where a tokenizer would be
    source: Path  # the file or folder read
    nanogpt: bool = False
    family: Family = field(default=gpt2.GPT2)


def load(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: Config | None = None,
    allow_nonfinite: bool = False,
    *,
    device_map: DeviceMap | None = None,
    n_devices: int | None = None,
) -> Model:
    """A ``Model`` with exactly the checkpoint's weights (nothing folded or centred).

    ``device`` defaults to CUDA when there is one, else the CPU; ``dtype`` to float32
    (each tensor is converted once, straight into it: a bfloat16 load never holds the
    model in float32). A safetensors tensor already in ``dtype`` and layout is used, on the
    CPU, from the file's private copy-on-write mapping without a copy (as ``transformers``
    does): editing the model never changes the file, but do not overwrite that file in
    place while the model is alive (``resid.save`` writes a new file and renames it, which
    is safe). ``config`` overrides the shapes read from (or, for a bare weight
    file, guessed from) the checkpoint. Every config value and every tensor is checked
    before anything is allocated; NaN or Inf weights raise ``CheckpointError`` unless
    ``allow_nonfinite=True`` (then a warning names them). Finding NaN and Inf reads every
    byte, so once a safetensors checkpoint is found clean a small record of its files'
    identity is kept (``resid.io.checked``, under ``$RESID_CACHE`` or ``~/.cache/resid``)
    and loading the same unchanged files into the same dtype again skips that read. Paths ending in ``.gguf`` are
    read by ``resid.io.gguf.load_gguf``. ``device_map`` (``"auto"``, ``{"blocks.0-11":
    "cuda:0", "blocks.12-23": "cuda:1"}``, a list of devices) or ``n_devices`` place
    consecutive blocks on several devices (``Model.to_devices``): the weights are read on
    the CPU and each block then moved to its device.

    >>> model = resid.load("path/to/folder", dtype=torch.bfloat16)
    >>> model = resid.load("path/to/folder", device_map="auto")     # blocks over the GPUs
    """
    if device_map is not None or n_devices is not None:
        if device is not None:
            raise ValueError("give device= or device_map=/n_devices=, not both")
        model = load(name_or_path, "cpu", dtype, config, allow_nonfinite)
        return model.to_devices(device_map, n_devices)
    if str(name_or_path).endswith(".gguf"):
        path = locate(name_or_path)
        if gguf is None:
            raise CheckpointError(
                f"{path} is a GGUF file: reading it needs the gguf package "
                "(pip install 'resid[gguf]')"
            )
        return gguf.load_gguf(path, dtype=dtype, device=device)
    return build(read(name_or_path), device, dtype, config, allow_nonfinite)


def build(
    ckpt: Checkpoint,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: Config | None = None,
    allow_nonfinite: bool = False,
) -> Model:
    """The ``Model`` of a checkpoint already read (see ``read``)."""
    cfg = config or ckpt.config
    entries = {k: ckpt.weights.stored(k) for k in ckpt.weights}
    params = check(entries, cfg, ckpt.family, ckpt.source)  # names and shapes first
    return build_model(entries, params, cfg, ckpt.family, tokenizer=_tokenizer_for(ckpt, cfg),
                       dtype=dtype, device=device, allow_nonfinite=allow_nonfinite,
                       source=ckpt.source)  # fmt: skip


def _tokenizer_for(ckpt: Checkpoint, cfg: Config) -> Tokenizer | None:
    """The folder's own tokenizer, or GPT-2's where the vocabulary is GPT-2's: exactly
    50257, or a nanoGPT checkpoint's padded one (50304: the ids below 50257 are GPT-2's).
    A tokenizer file that does not load, is not a regular file or is larger than
    ``MAX_TOKENIZER_BYTES`` is a ``CheckpointError``."""
    folder = ckpt.folder
    own = folder is not None and (
        os.path.lexists(folder / "tokenizer.json")
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    )
    if not (own or cfg.d_vocab == GPT2_VOCAB or (ckpt.nanogpt and cfg.d_vocab >= GPT2_VOCAB)):
        return None
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if own and os.path.lexists(folder / name):
            size = require_regular(folder / name, "tokenizer file").st_size
            if size > MAX_TOKENIZER_BYTES:
                raise CheckpointError(
                    f"the tokenizer file {folder / name} is {size:,} bytes: far too large to "
                    f"be one (the limit is {MAX_TOKENIZER_BYTES:,}); remove it or pass token ids"
                )
    try:
        tokenizer = Tokenizer.from_folder(folder) if own else Tokenizer.gpt2()
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(
            f"the tokenizer beside {ckpt.source} does not load ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}): fix or remove "
            f"{folder}/tokenizer.json (and tokenizer_config.json)"
        ) from e
    if tokenizer.vocab_size > cfg.d_vocab:
        warnings.warn(
            f"the tokenizer beside {ckpt.source} has {tokenizer.vocab_size} tokens but the model "
            f"only {cfg.d_vocab}: it is not this model's, so none is attached (pass token ids)",
            stacklevel=4,
        )
        return None
    return tokenizer


def read(name_or_path: str | Path) -> Checkpoint:
    """Read and check a checkpoint's headers and config, reading no tensor data.

    >>> ckpt = read("path/to/folder"); ckpt.config.n_layers
    """
    path = locate(name_or_path)
    if path.is_dir():
        file, raw = read_folder(path)
        folder, source = path, (path if file.name.endswith(".index.json") else file)
    else:
        require_regular(path, "checkpoint")
        raw, folder, source = read_weights(path), path.parent, path
    if nanogpt.is_nanogpt(raw):
        where = f"{source} (nanoGPT model_args)"
        bias = nanogpt.bias_flag(raw["model_args"], where)
        if not isinstance(raw["model_args"], dict):
            nanogpt.config(raw["model_args"], where)  # raises, naming the type
        entries = normalise(nanogpt.as_gpt2(raw["model"], source, bias), gpt2.GPT2, source)
        cfg = nanogpt.config(raw["model_args"], where, gpt2.GPT2.held(entries))
        return Checkpoint(Weights(entries), cfg, folder, source, nanogpt=True)
    config_path = folder / "config.json"
    if os.path.lexists(config_path):
        hf = read_json(config_path, "config")
        fam = families.family(hf, str(config_path))
        entries = normalise(raw, fam, source)
        cfg = fam.config(hf, str(config_path), fam.held(entries))
    else:
        fam = gpt2.GPT2
        entries = normalise(raw, fam, source)
        where = f"{folder} (no config.json; shapes guessed from the weights)"
        shapes = {k: s.shape for k, s in entries.items()}
        cfg = gpt2.guess_config(shapes, fam.held(entries), where)
    return Checkpoint(Weights(entries), cfg, folder, source, family=fam)


def read_checkpoint(name_or_path: str | Path) -> tuple[Weights, Config, Path | None]:
    """(the checkpoint's tensors by name, read on demand; their Config; the folder they
    came from). GPT-2 and nanoGPT tensors are in GPT-2's names and ``Conv1D`` layout."""
    ckpt = read(name_or_path)
    return ckpt.weights, ckpt.config, ckpt.folder


def config_from_hf(hf: dict, source: str | Path = "config.json") -> Config:
    """resid's Config from a Hugging Face ``config.json`` of any family resid reads, every
    value type- and range-checked (missing ones take transformers' defaults).

    >>> config_from_hf({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64})
    """
    return families.config_from_hf(hf, str(source))


def to_resid_state_dict(
    weights: dict[str, Tensor],
    cfg: Config,
    allow_nonfinite: bool = False,
    source: str | Path = "the checkpoint",
) -> dict[str, Tensor]:
    """Check a family's weights (``transformers``' names, prefixes allowed) against ``cfg``
    and rename them to resid's parameters; ``weights`` is not modified.

    Raises ``CheckpointError`` naming the problem: missing, unexpected or mis-shaped keys,
    integer or bool tensors, NaN or Inf values (a warning instead with
    ``allow_nonfinite=True``), a tied unembedding that is not the embedding.

    >>> state = to_resid_state_dict(hf_gpt2.transformer.state_dict(), cfg)
    """
    return families.to_resid(weights, cfg, str(source), allow_nonfinite=allow_nonfinite)


# ---- names and paths ---------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(name: str) -> bool:
    """``./x``, ``../x``, ``/x``, ``~/x``, Windows separators, deeper than ``owner/name``,
    a checkpoint file's suffix, or a first component that is a local folder."""
    first = name.split("/", 1)[0]
    return (
        name.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or name in (".", "..")
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(CHECKPOINT_SUFFIXES)
        or ("/" in name and Path(first).is_dir())
    )


def _in_hub_cache(repo_id: str) -> bool:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    cache = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    return os.path.isdir(os.path.join(cache, "models--" + repo_id.replace("/", "--")))


def locate(name_or_path: str | Path) -> Path:
    """The file or folder a name or path stands for; a hub name is fetched (or found in
    the huggingface_hub cache) as a folder. A string that names a local path, or looks like
    one, is never sent to the hub.

    >>> locate("gpt2")          # .../snapshots/<commit>, from the hub's cache
    """
    path = Path(name_or_path).expanduser()
    if os.path.lexists(path):
        return path
    name = str(name_or_path)
    hub_like = name in HUB_NAMES or re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    if (
        isinstance(name_or_path, Path)
        or _looks_like_path(name)
        or (hub_like and name not in HUB_NAMES and _offline() and not _in_hub_cache(name))
    ):
        raise CheckpointError(
            f"no file or folder at {Path(os.path.abspath(path))}"
            + (" (nor, offline, a copy of a hub model of that name in the local cache)" if hub_like else "")
            + f": check the path. For a small random stand-in GPT-2 there, run `{STAND_IN} {name}`."
        )  # fmt: skip
    if hub_like:
        return _download(HUB_NAMES.get(name, name))
    raise CheckpointError(
        f"'{name}' is neither a file, a folder, nor a known model: give a path to a checkpoint "
        f"or one of {', '.join(HUB_NAMES)} (offline: `{STAND_IN} DIR` writes a stand-in GPT-2)"
    )


def _download(repo_id: str) -> Path:
    import huggingface_hub  # only for hub names: an optional, slow import
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        how = ("unset HF_HUB_OFFLINE and download it once with a network"
               if _offline() else "download it once with a network")  # fmt: skip
        raise CheckpointError(
            f"could not get '{repo_id}' from the Hugging Face hub, and no copy is in the local "
            f"cache ({type(e).__name__}). To use it, {how}; or pass the path of a local "
            f"checkpoint folder or file. With no network, `{STAND_IN} DIR` writes a small random "
            "stand-in GPT-2 to DIR."
        ) from e


# ---- saving ------------------------------------------------------------------------------


def save(model: Model, folder: str | Path) -> Path:
    """Write ``model`` as Hugging Face saves a GPT-2: ``config.json`` + ``model.safetensors``
    (+ ``tokenizer.json`` when the model carries a tokenizer).

    Both ``resid.load`` and ``transformers.GPT2LMHeadModel.from_pretrained`` read it back.
    The folder is written whole into a hidden sibling and swapped in at the end, so a crash
    leaves either the old checkpoint or the new one, never a mix, and no stale weight or
    tokenizer file of an earlier save. An existing ``folder`` is replaced only when it is
    empty or was written by ``resid.save`` (its ``resid-manifest.json`` lists every file
    with its hash); anything else raises ``ForeignFilesError`` naming the files.

    >>> resid.save(model, "my-gpt2")
    """
    import safetensors.torch

    c = model.cfg
    if c.architecture != "gpt2":
        raise ValueError(
            f"resid.save writes GPT-2 checkpoints; this model is a {c.architecture} "
            f"({families.SUPPORTED.get(c.architecture, '?')}): save the Hugging Face model it came from"
        )
    if c.processing:
        raise ValueError(
            f"resid.save writes a checkpoint's exact weights; this model's were processed "
            f"({', '.join(c.processing)}), which a GPT-2 checkpoint cannot hold: save the "
            "model you processed, and process it again after loading"
        )
    tokenizer = model._tokenizer
    if tokenizer is not None and tokenizer.vocab_size > c.d_vocab:
        tokenizer = None
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    elif c.d_vocab == GPT2_VOCAB:  # the model will use GPT-2's tokenizer
        special = {"bos_token_id": GPT2_VOCAB - 1, "eos_token_id": GPT2_VOCAB - 1}
    else:  # a vocabulary of its own, with no tokenizer to say which id is which
        special = {}
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": c.n_layers,
        "n_head": c.n_heads, "n_embd": c.d_model, "n_inner": c.d_mlp, "vocab_size": c.d_vocab,
        "n_positions": c.n_ctx, "layer_norm_epsilon": c.layer_norm_eps, "activation_function": c.act_fn,
        **{k: v for k, v in special.items() if v is not None}, "tie_word_embeddings": True,
    }  # fmt: skip
    weights = {
        f"transformer.{k}": v.contiguous().cpu() for k, v in to_gpt2_state_dict(model).items()
    }
    out = Path(os.path.abspath(Path(folder).expanduser()))
    with files.replace_folder(out, WRITER, "folder", durable=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file(
            weights, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        if tokenizer is not None:
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
    return out


# ---- names that moved (DeprecationWarning) -----------------------------------------------

_MOVED = {
    "BLOCK_NAMES": (gpt2, "resid.io.families.gpt2"),
    "OUTER_NAMES": (gpt2, "resid.io.families.gpt2"),
    "gpt2_shapes": (gpt2, "resid.io.families.gpt2"),
    "LINEAR_WEIGHTS": (nanogpt, "resid.io.families.nanogpt"),
    "MAX_JSON_BYTES": (checkpoint, "resid.io.checkpoint"),
}


def __getattr__(name: str):
    if name == "MASK_BUFFER":
        warnings.warn("resid.io.loading.MASK_BUFFER moved to resid.io.families.NON_WEIGHTS",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        return families.NON_WEIGHTS
    if name in _MOVED:
        module, where = _MOVED[name]
        warnings.warn(
            f"resid.io.loading.{name} moved to {where}.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(module, name)
    raise AttributeError(f"module 'resid.io.loading' has no attribute {name!r}")


__all__ = [
    "HUB_NAMES",
    "Checkpoint",
    "CheckpointError",
    "build",
    "config_from_hf",
    "from_hf",
    "load",
    "locate",
    "read",
    "read_checkpoint",
    "save",
    "to_gpt2_state_dict",
    "to_resid_state_dict",
]
