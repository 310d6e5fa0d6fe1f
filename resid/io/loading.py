"""Loading GPT-2 checkpoints: hub names, Hugging Face folders, single weight files, nanoGPT.

>>> model = resid.load("gpt2")                          # hub (its cache; HF_HUB_OFFLINE works)
>>> model = resid.load("path/to/hf-folder")             # config.json + model.safetensors / .bin
>>> model = resid.load("model.safetensors")             # one file (config.json beside it, if any)
>>> model = resid.load("out/ckpt.pt")                   # nanoGPT: model_args + model

Every source is first brought to one layout, GPT-2's own names without the
``transformer.`` prefix, with ``Conv1D`` weights ``[in, out]`` (GPT-2's checkpoints store
them so; nanoGPT's ``nn.Linear`` stores ``[out, in]``, and is transposed here, once).
Then every tensor's shape is checked against the config before anything is built.
Pickled files are always read with ``torch.load(..., weights_only=True, mmap=True)``: a
pickle that would run code is refused, never run, and storages stay in the file until their
sizes are checked against it. Nothing is allocated before it is checked: config values are
type- and range-checked, the number of blocks against the weights actually present, shard
paths confined to their folder (regular files only), every tensor's size against its
file; non-finite and non-float weights are refused. Every failure is a ``CheckpointError``
naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from resid.core import files
from resid.core.config import Config
from resid.core.model import Model
from resid.core.tokenizer import Tokenizer
from resid.io import families
from resid.io.errors import CheckpointError

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
             "vocab.json", "merges.txt"]  # fmt: skip
# Causal-mask buffers some GPT-2 checkpoints carry; they are not weights.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
# GPT-2's names for a block's weights -> resid's. Outside the blocks: wte, wpe, ln_f.
BLOCK_NAMES = {"ln_1.weight": "ln1.w", "ln_1.bias": "ln1.b", "ln_2.weight": "ln2.w", "ln_2.bias": "ln2.b",
               "attn.c_attn.weight": "attn.W_QKV", "attn.c_attn.bias": "attn.b_QKV",
               "attn.c_proj.weight": "attn.W_O", "attn.c_proj.bias": "attn.b_O",
               "mlp.c_fc.weight": "mlp.W_in", "mlp.c_fc.bias": "mlp.b_in",
               "mlp.c_proj.weight": "mlp.W_out", "mlp.c_proj.bias": "mlp.b_out"}  # fmt: skip
OUTER_NAMES = {
    "wte.weight": "W_E",
    "wpe.weight": "W_pos",
    "ln_f.weight": "ln_final.w",
    "ln_f.bias": "ln_final.b",
}
LINEAR_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


MAX_JSON_BYTES = 16 << 20  # config.json, the shard index: far larger is not a GPT-2 config
WRITER = "resid.save"
GPT2_VOCAB = 50257  # GPT-2's tokenizer: ids 0-50255, then <|endoftext|> = 50256


@dataclass
class Checkpoint:
    """A checkpoint as read from disk, before a model is built from it."""

    weights: dict[str, Tensor]  # GPT-2 names, Conv1D [in, out] layout
    config: Config
    folder: Path | None  # where a tokenizer would be
    source: Path  # the file or folder read
    nanogpt: bool = False


def load(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: Config | None = None,
    allow_nonfinite: bool = False,
) -> Model:
    """A GPT-2 ``Model`` with exactly the checkpoint's weights (nothing folded or centred).

    ``device`` defaults to CUDA when there is one, else the CPU; ``dtype`` to float32.
    ``config`` overrides the shapes read from (or, for a bare weight file, guessed from)
    the checkpoint. Every config value and every tensor is checked before anything is
    allocated; NaN or Inf weights raise ``CheckpointError`` unless ``allow_nonfinite=True``
    (then a warning names them).
    """
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
    state = to_resid_state_dict(ckpt.weights, cfg, allow_nonfinite, source=ckpt.source)
    tokenizer = _tokenizer_for(ckpt, cfg)
    with torch.device("meta"):
        model = Model(cfg, tokenizer=tokenizer)
    model.load_state_dict(state, assign=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=dtype or torch.float32)


def _tokenizer_for(ckpt: Checkpoint, cfg: Config) -> Tokenizer | None:
    """The folder's own tokenizer, or GPT-2's where the vocabulary is GPT-2's: exactly
    50257, or a nanoGPT checkpoint's padded one (50304: the ids below 50257 are GPT-2's)."""
    folder = ckpt.folder
    own = folder is not None and (
        (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    )
    if not (own or cfg.d_vocab == GPT2_VOCAB or (ckpt.nanogpt and cfg.d_vocab >= GPT2_VOCAB)):
        return None
    tokenizer = Tokenizer.from_folder(folder) if folder is not None else Tokenizer.gpt2()
    if tokenizer.vocab_size > cfg.d_vocab:
        warnings.warn(
            f"the tokenizer beside {ckpt.source} has {tokenizer.vocab_size} tokens but the model "
            f"only {cfg.d_vocab}: it is not this model's, so none is attached (pass token ids)",
            stacklevel=3,
        )
        return None
    return tokenizer


def read(name_or_path: str | Path) -> Checkpoint:
    """Read and check a checkpoint (weights and config), building nothing."""
    path = locate(name_or_path)
    if path.is_dir():
        return _read_folder(path)
    _require_regular(path, "checkpoint")
    return _read_file(path)


def read_checkpoint(name_or_path: str | Path) -> tuple[dict[str, Tensor], Config, Path | None]:
    """(GPT-2-named weights in ``[in, out]`` layout, their Config, the folder they came from)."""
    ckpt = read(name_or_path)
    return ckpt.weights, ckpt.config, ckpt.folder


def locate(name_or_path: str | Path) -> Path:
    """The file or folder a name or path stands for; a hub name is fetched (or found in
    the huggingface_hub cache) as a folder."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in HUB_NAMES or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _download(HUB_NAMES.get(name, name))
    raise CheckpointError(
        f"'{name}' is neither a file, a folder, nor a known model: give a path to a checkpoint "
        f"or one of {', '.join(HUB_NAMES)}"
    )


def _download(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not get '{repo_id}' from the Hugging Face hub, and no copy is in the local "
            f"cache ({type(e).__name__}). Download it once with a network (unset HF_HUB_OFFLINE), "
            "or pass the path of a local checkpoint folder or file."
        ) from e


def _require_regular(path: Path, what: str) -> os.stat_result:
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


def _read_json(path: Path, what: str):
    st = _require_regular(path, what)
    if st.st_size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"the {what} {path} is {st.st_size:,} bytes: far too large to be one "
            f"(the limit is {MAX_JSON_BYTES:,})"
        )
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"the {what} {path} is not valid JSON: {e}") from e


def _read_folder(folder: Path) -> Checkpoint:
    for name in ("model.safetensors", "pytorch_model.bin", "ckpt.pt"):
        if (folder / name).is_file():
            ckpt = _read_file(folder / name)
            ckpt.folder = folder
            return ckpt
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        data = _read_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index} has no 'weight_map' of tensor names to shard file names"
            )
        weights: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(_read_weights(_shard_path(folder, shard, index)))
        _check_tensors(weights, index)
        weights = _normalise(weights, index)
        return Checkpoint(weights, _config_for(folder, weights), folder, folder)
    raise CheckpointError(
        f"{folder} holds no checkpoint: expected model.safetensors, pytorch_model.bin, "
        f"a sharded model.safetensors.index.json, or a nanoGPT ckpt.pt"
    )


def _shard_path(folder: Path, shard: str, index: Path) -> Path:
    """``folder / shard``, refused unless it names a regular file inside ``folder`` (or, for a
    huggingface_hub snapshot, inside the cached repository its links point into)."""
    name = PurePosixPath(shard)
    if not shard or "\x00" in shard or name.is_absolute() or os.path.isabs(shard):
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
    _require_regular(path, "shard")
    return path


def _read_file(path: Path) -> Checkpoint:
    raw = _read_weights(path)
    if "model_args" in raw and "model" in raw:  # nanoGPT's train.py checkpoint
        return _from_nanogpt(raw, path)
    _check_tensors(raw, path)
    weights = _normalise(raw, path)
    return Checkpoint(weights, _config_for(path.parent, weights), path.parent, path)


def _check_tensors(weights: dict, path: Path) -> None:
    """A state dict: string keys, tensor values whose data fits in the file."""
    bad = [k for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict of tensors (nor a nanoGPT checkpoint with "
            f"'model_args' and 'model'): {', '.join(map(repr, bad[:6]))} "
            f"{'is not a tensor' if len(bad) == 1 else 'are not tensors'}"
        )


def _read_weights(path: Path) -> dict:
    size = _require_regular(path, "checkpoint").st_size
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:  # safetensors checks every tensor's declared extent against the file
            return safetensors.torch.load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}): is it truncated?"
            ) from e
    # mmap: storages are views of the file, so nothing is allocated before it is checked
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: its pickle holds Python objects other than tensors, and "
            "unpickling them could run arbitrary code. If you trust the file, convert it to "
            f"safetensors first. (torch said: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # a text file, a truncated zip, …: torch raises many kinds
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle of tensors): {e}"
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
    if mmap:  # copies, now that they are checked: a file changed under a mapping can crash us
        obj = {k: v.clone() if isinstance(v, Tensor) else v for k, v in obj.items()}
        if isinstance(obj.get("model"), dict):
            obj["model"] = {
                k: v.clone() if isinstance(v, Tensor) else v for k, v in obj["model"].items()
            }
    return obj


def _normalise(weights: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Strip ``_orig_mod.`` (torch.compile) and ``transformer.`` prefixes; drop mask buffers."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("_orig_mod.").removeprefix("transformer.")
        if not MASK_BUFFER.search(key):
            if key in out:
                raise CheckpointError(f"{path} holds '{key}' twice (with and without a prefix)")
            out[key] = value
    return out


def _positive_int(d: dict, key: str, where: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        got = "missing" if key not in d else f"{value!r} ({type(value).__name__})"
        raise CheckpointError(f"{where}: '{key}' must be a positive integer, not {got}")
    return value


def _positive_float(d: dict, key: str, where: str, default: float) -> float:
    value = d.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise CheckpointError(f"{where}: '{key}' must be a positive finite number, not {value!r}")
    return float(value)


def _config(where: str, **fields) -> Config:
    if fields["d_model"] % fields["n_heads"]:
        raise CheckpointError(
            f"{where}: the width {fields['d_model']} is not a multiple of the {fields['n_heads']} "
            "heads: GPT-2 splits the residual stream evenly across its heads"
        )
    try:
        return Config(d_head=fields["d_model"] // fields["n_heads"], **fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def _from_nanogpt(ckpt: dict, path: Path) -> Checkpoint:
    args, model = ckpt["model_args"], ckpt["model"]
    where = f"{path} (nanoGPT model_args)"
    if not isinstance(args, dict):
        raise CheckpointError(f"{where} is a {type(args).__name__}, not a dict of settings")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
    bias = args.get("bias", True)
    if not isinstance(bias, bool):
        raise CheckpointError(f"{where}: 'bias' must be true or false, not {bias!r}")
    n_embd = _positive_int(args, "n_embd", where)
    cfg = _config(
        where, n_layers=_positive_int(args, "n_layer", where),
        n_heads=_positive_int(args, "n_head", where), d_model=n_embd, d_mlp=4 * n_embd,
        d_vocab=_positive_int(args, "vocab_size", where),
        n_ctx=_positive_int(args, "block_size", where), act_fn="gelu",
    )  # fmt: skip
    _check_tensors(model, path)
    weights = _normalise(model, path)
    weights = {k: v.T if k.endswith(LINEAR_WEIGHTS) else v for k, v in weights.items()}
    if not bias:  # nanoGPT's bias=False: every bias is zero
        for key, w in list(weights.items()):
            if key.endswith(".weight") and key not in (
                "wte.weight",
                "wpe.weight",
                "lm_head.weight",
            ):
                if w.dim() >= 1 and key[: -len("weight")] + "bias" not in weights:
                    weights[key[: -len("weight")] + "bias"] = torch.zeros(
                        w.shape[-1], dtype=w.dtype if w.is_floating_point() else torch.float32
                    )
    return Checkpoint(weights, cfg, path.parent, path, nanogpt=True)


def _config_for(folder: Path, weights: dict[str, Tensor]) -> Config:
    """The config.json beside the weights, or shapes guessed from the weights themselves."""
    path = folder / "config.json"
    if os.path.lexists(path):
        return config_from_hf(_read_json(path, "config"), path)
    wte, wpe = weights.get("wte.weight"), weights.get("wpe.weight")
    if wte is None or wpe is None or wte.dim() != 2 or wpe.dim() != 2:
        raise CheckpointError(
            "these weights are not a GPT-2 state dict: no 2-D 'wte.weight' / 'wpe.weight' "
            f"(keys start {sorted(weights)[:6]})"
        )
    (d_vocab, d_model), n_ctx = wte.shape, wpe.shape[0]
    n_layers = len(_block_indices(weights))
    fc = weights.get("h.0.mlp.c_fc.weight")
    d_mlp = fc.shape[-1] if fc is not None and fc.dim() == 2 else 4 * d_model
    where = f"{folder} (no config.json; shapes guessed from the weights)"
    if d_model < 64 or d_model % 64:
        raise CheckpointError(
            f"{where}: the width {d_model} is not a multiple of GPT-2's 64-dimensional heads; "
            "pass config=resid.Config(...) with the right n_heads and d_head"
        )
    warnings.warn(
        "no config.json beside the weights: assuming GPT-2's 64-dimensional heads "
        f"(n_heads={d_model // 64}). Pass config=resid.Config(...) if that is wrong.",
        stacklevel=5,
    )
    return _config(where, n_layers=max(n_layers, 1), n_heads=d_model // 64, d_model=d_model,
                   d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx)  # fmt: skip


def _block_indices(weights: dict[str, Tensor]) -> set[int]:
    return {int(m.group(1)) for k in weights if (m := re.match(r"h\.(\d+)\.", k))}


def config_from_hf(hf: dict, source: str | Path = "config.json") -> Config:
    """resid's Config from a Hugging Face GPT-2 ``config.json``, every value type- and
    range-checked (missing ones take GPT2Config's defaults, as transformers does)."""
    where = str(source)
    if not isinstance(hf, dict):
        raise CheckpointError(
            f"{where} holds a JSON {type(hf).__name__}, not an object of GPT-2 settings"
        )
    if families.family_of(hf, where) != "gpt2":
        return families.config_from_hf(hf, where)
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise CheckpointError(
            f"{where}: activation {act!r} is not supported: resid's GPT-2 uses GELU"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError(
            f"{where}: this config scales attention differently from GPT-2, which resid does not"
        )
    d_model = _positive_int(hf, "n_embd", where, 768)
    n_inner = hf.get("n_inner")
    return _config(
        where, n_layers=_positive_int(hf, "n_layer", where, 12),
        n_heads=_positive_int(hf, "n_head", where, 12), d_model=d_model,
        d_mlp=4 * d_model if n_inner is None else _positive_int(hf, "n_inner", where),
        d_vocab=_positive_int(hf, "vocab_size", where, GPT2_VOCAB),
        n_ctx=_positive_int(hf, "n_positions", where, 1024),
        layer_norm_eps=_positive_float(hf, "layer_norm_epsilon", where, 1e-5),
        act_fn="gelu" if act == "gelu" else "gelu_new",
    )  # fmt: skip


def gpt2_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every weight of a GPT-2 checkpoint, by its GPT-2 name, with its ``[in, out]`` shape."""
    d, m = cfg.d_model, cfg.d_mlp
    shapes = {"wte.weight": (cfg.d_vocab, d), "wpe.weight": (cfg.n_ctx, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}  # fmt: skip
    for i in range(cfg.n_layers):
        shapes |= {
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, m), f"h.{i}.mlp.c_fc.bias": (m,),
            f"h.{i}.mlp.c_proj.weight": (m, d), f"h.{i}.mlp.c_proj.bias": (d,),
        }  # fmt: skip
    return shapes


def to_resid_state_dict(
    weights: dict[str, Tensor],
    cfg: Config,
    allow_nonfinite: bool = False,
    source: str | Path = "the checkpoint",
) -> dict[str, Tensor]:
    """Check GPT-2-named weights against ``cfg`` and rename them to resid's parameters.

    Raises ``CheckpointError`` naming the problem: a config asking for more blocks than the
    weights hold (checked first, so a bogus ``n_layer`` costs nothing), missing, unexpected
    or mis-shaped keys, integer or bool tensors, NaN or Inf values (a warning instead with
    ``allow_nonfinite=True``), an ``lm_head`` that is not the embedding.
    """
    if cfg.architecture != "gpt2":
        state = families.to_resid(weights, cfg, str(source))
        _check_finite(state, source, allow_nonfinite)
        return state
    blocks = _block_indices(weights)
    held = max(blocks) + 1 if blocks else 0
    if cfg.n_layers > held:
        raise CheckpointError(
            f"the config of {source} asks for {cfg.n_layers:,} blocks but the weights hold "
            f"{len(blocks)} (h.0 … h.{held - 1}): fix n_layer in its config"
            if blocks
            else f"the config of {source} asks for {cfg.n_layers:,} blocks but the weights hold none"
        )
    expected = gpt2_shapes(cfg)
    weights = dict(weights)
    lm_head = weights.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [
        f"{k}: expected {list(s)}, got {list(weights[k].shape)}"
        for k, s in expected.items()
        if k in weights and tuple(weights[k].shape) != s
    ]
    if lm_head is not None and tuple(lm_head.shape) != expected["wte.weight"]:
        misshaped.append(
            f"lm_head.weight: expected {list(expected['wte.weight'])}, got {list(lm_head.shape)}"
        )
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:12])}{' …' if len(keys) > 12 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("mis-shaped keys", misshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"{source} does not fit a GPT-2 of this config ({cfg}):\n  " + "\n  ".join(parts)
        )
    named = dict(weights) | ({"lm_head.weight": lm_head} if lm_head is not None else {})
    not_float = [f"{k} ({v.dtype})" for k, v in named.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(
            f"{source} holds non-floating-point weights: {', '.join(not_float[:8])}; "
            "GPT-2's weights are floats (is this a quantised or corrupted checkpoint?)"
        )
    _check_finite(named, source, allow_nonfinite)
    if lm_head is not None and not _same(lm_head, weights["wte.weight"]):
        raise CheckpointError(
            f"in {source}, lm_head.weight differs from wte.weight: resid's GPT-2 ties its "
            "unembedding to the embedding"
        )
    state = {dst: weights[src] for src, dst in OUTER_NAMES.items()}
    for i in range(cfg.n_layers):
        for src, dst in BLOCK_NAMES.items():
            state[f"blocks.{i}.{dst}"] = weights[f"h.{i}.{src}"]
        W_O = state[f"blocks.{i}.attn.W_O"]
        state[f"blocks.{i}.attn.W_O"] = W_O.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)
    return {k: v.contiguous() for k, v in state.items()}


def _check_finite(named: dict[str, Tensor], source, allow_nonfinite: bool) -> None:
    nonfinite = [k for k, v in named.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        listed = ", ".join(nonfinite[:8]) + (" …" if len(nonfinite) > 8 else "")
        if not allow_nonfinite:
            raise CheckpointError(
                f"{source} holds non-finite weights (NaN or Inf) in {listed}: the checkpoint is "
                "corrupt or training diverged. Pass allow_nonfinite=True to load it anyway."
            )
        warnings.warn(f"{source} holds non-finite weights (NaN or Inf) in {listed}", stacklevel=4)


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal, with NaN equal to NaN (only reachable with ``allow_nonfinite=True``)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def to_gpt2_state_dict(model: Model) -> dict[str, Tensor]:
    """The model's weights under GPT-2's names and ``Conv1D`` layout (what HF's GPT2Model loads)."""
    params = dict(model.named_parameters())
    out = {src: params[dst] for src, dst in OUTER_NAMES.items()}
    for i in range(model.cfg.n_layers):
        for src, dst in BLOCK_NAMES.items():
            out[f"h.{i}.{src}"] = params[f"blocks.{i}.{dst}"]
        out[f"h.{i}.attn.c_proj.weight"] = out[f"h.{i}.attn.c_proj.weight"].flatten(0, 1)
    return {k: v.detach() for k, v in out.items()}


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
            f"({families.SUPPORTED[c.architecture]}): save the Hugging Face model it came from"
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
