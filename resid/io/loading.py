"""Loading GPT-2 checkpoints: hub names, Hugging Face folders, single weight files, nanoGPT.

>>> model = resid.load("gpt2")                          # hub (its cache; HF_HUB_OFFLINE works)
>>> model = resid.load("path/to/hf-folder")             # config.json + model.safetensors / .bin
>>> model = resid.load("model.safetensors")             # one file (config.json beside it, if any)
>>> model = resid.load("out/ckpt.pt")                   # nanoGPT: model_args + model

Every source is first brought to one layout, GPT-2's own names without the
``transformer.`` prefix, with ``Conv1D`` weights ``[in, out]`` (GPT-2's checkpoints store
them so; nanoGPT's ``nn.Linear`` stores ``[out, in]``, and is transposed here, once).
Then every tensor's shape is checked against the config before anything is built.
Pickled files are always read with ``torch.load(..., weights_only=True)``: a pickle that
would run code is refused, never run.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from resid.model import Config, Model
from resid.tokenizer import Tokenizer

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


class CheckpointError(ValueError):
    """A file or folder that is not a GPT-2 checkpoint resid can read; the message says why."""


def load(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: Config | None = None,
) -> Model:
    """A GPT-2 ``Model`` with exactly the checkpoint's weights (nothing folded or centred).

    ``device`` defaults to CUDA when there is one, else the CPU; ``dtype`` to float32.
    ``config`` overrides the shapes read from (or, for a bare weight file, guessed from)
    the checkpoint.
    """
    weights, found_cfg, folder = read_checkpoint(name_or_path)
    cfg = config or found_cfg
    state = to_resid_state_dict(weights, cfg)
    with torch.device("meta"):
        model = Model(
            cfg, tokenizer=Tokenizer.from_folder(folder) if cfg.d_vocab == 50257 else None
        )
    model.load_state_dict(state, assign=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=dtype or torch.float32)


def read_checkpoint(name_or_path: str | Path) -> tuple[dict[str, Tensor], Config, Path | None]:
    """(GPT-2-named weights in ``[in, out]`` layout, their Config, the folder they came from)."""
    path = locate(name_or_path)
    return _read_folder(path) if path.is_dir() else _read_file(path)


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


def _read_folder(folder: Path) -> tuple[dict[str, Tensor], Config, Path]:
    for name in ("model.safetensors", "pytorch_model.bin", "ckpt.pt"):
        if (folder / name).is_file():
            weights, cfg, _ = _read_file(folder / name)
            return weights, cfg, folder
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(_read_weights(folder / shard))
        return _normalise(weights), _config_for(folder, weights), folder
    raise CheckpointError(
        f"{folder} holds no checkpoint: expected model.safetensors, pytorch_model.bin, "
        f"a sharded model.safetensors.index.json, or a nanoGPT ckpt.pt"
    )


def _read_file(path: Path) -> tuple[dict[str, Tensor], Config, Path]:
    raw = _read_weights(path)
    if "model_args" in raw and "model" in raw:  # nanoGPT's train.py checkpoint
        return _from_nanogpt(raw, path)
    if not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(
            f"{path} is not a state dict of tensors (nor a nanoGPT checkpoint with "
            f"'model_args' and 'model'); its keys are {sorted(raw)[:8]}"
        )
    weights = _normalise(raw)
    return weights, _config_for(path.parent, weights), path.parent


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}): is it truncated?"
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    return obj


def _normalise(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip ``_orig_mod.`` (torch.compile) and ``transformer.`` prefixes; drop mask buffers."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("_orig_mod.").removeprefix("transformer.")
        if not MASK_BUFFER.search(key):
            out[key] = value
    return out


def _from_nanogpt(ckpt: dict, path: Path) -> tuple[dict[str, Tensor], Config, Path]:
    args = ckpt["model_args"]
    weights = _normalise(ckpt["model"])
    weights = {k: v.T if k.endswith(LINEAR_WEIGHTS) else v for k, v in weights.items()}
    if not args.get("bias", True):  # nanoGPT's bias=False: every bias is zero
        for key, w in list(weights.items()):
            if key.endswith(".weight") and key not in (
                "wte.weight",
                "wpe.weight",
                "lm_head.weight",
            ):
                weights.setdefault(
                    key[: -len("weight")] + "bias", torch.zeros(w.shape[-1], dtype=w.dtype)
                )
    cfg = Config(
        n_layers=args["n_layer"], n_heads=args["n_head"], d_model=args["n_embd"],
        d_head=args["n_embd"] // args["n_head"], d_mlp=4 * args["n_embd"],
        d_vocab=args["vocab_size"], n_ctx=args["block_size"], act_fn="gelu",
    )  # fmt: skip
    return weights, cfg, path.parent


def _config_for(folder: Path, weights: dict[str, Tensor]) -> Config:
    """The config.json beside the weights, or shapes guessed from the weights themselves."""
    if (folder / "config.json").is_file():
        return config_from_hf(json.loads((folder / "config.json").read_text()))
    if "wte.weight" not in weights or "wpe.weight" not in weights:
        raise CheckpointError(
            "these weights are not a GPT-2 state dict: no 'wte.weight' / 'wpe.weight' "
            f"(keys start {sorted(weights)[:6]})"
        )
    (d_vocab, d_model), n_ctx = weights["wte.weight"].shape, weights["wpe.weight"].shape[0]
    n_layers = len({k.split(".")[1] for k in weights if k.startswith("h.")})
    d_mlp = (
        weights["h.0.mlp.c_fc.weight"].shape[1] if "h.0.mlp.c_fc.weight" in weights else 4 * d_model
    )
    warnings.warn(
        "no config.json beside the weights: assuming GPT-2's 64-dimensional heads "
        f"(n_heads={d_model // 64}). Pass config=resid.Config(...) if that is wrong.",
        stacklevel=3,
    )
    return Config(n_layers=n_layers, n_heads=d_model // 64, d_model=d_model, d_head=64,
                  d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx)  # fmt: skip


def config_from_hf(hf: dict) -> Config:
    """resid's Config from a Hugging Face GPT-2 ``config.json``."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"this is a '{hf['model_type']}' checkpoint; resid reads GPT-2 only")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise CheckpointError(f"activation '{act}' is not supported: resid's GPT-2 uses GELU")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError(
            "this config scales attention differently from GPT-2, which resid does not"
        )
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    return Config(
        n_layers=hf["n_layer"], n_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
        d_mlp=hf.get("n_inner") or 4 * d_model, d_vocab=hf["vocab_size"], n_ctx=hf["n_positions"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), act_fn="gelu" if act == "gelu" else "gelu_new",
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


def to_resid_state_dict(weights: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Check GPT-2-named weights against ``cfg`` and rename them to resid's parameters."""
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
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:12])}{' …' if len(keys) > 12 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("mis-shaped keys", misshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"the checkpoint does not fit a GPT-2 of this config ({cfg}):\n  " + "\n  ".join(parts)
        )
    if lm_head is not None and not torch.equal(lm_head, weights["wte.weight"]):
        raise CheckpointError(
            "lm_head.weight differs from wte.weight: resid's GPT-2 ties its unembedding to the embedding"
        )
    state = {dst: weights[src] for src, dst in OUTER_NAMES.items()}
    for i in range(cfg.n_layers):
        for src, dst in BLOCK_NAMES.items():
            state[f"blocks.{i}.{dst}"] = weights[f"h.{i}.{src}"]
        W_O = state[f"blocks.{i}.attn.W_O"]
        state[f"blocks.{i}.attn.W_O"] = W_O.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)
    return {k: v.contiguous() for k, v in state.items()}


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
    """Write ``model`` as Hugging Face saves a GPT-2: ``config.json`` + ``model.safetensors``.

    Both ``resid.load`` and ``transformers.GPT2LMHeadModel.from_pretrained`` read it back.

    >>> resid.save(model, "my-gpt2")
    """
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": c.n_layers,
        "n_head": c.n_heads, "n_embd": c.d_model, "n_inner": c.d_mlp, "vocab_size": c.d_vocab,
        "n_positions": c.n_ctx, "layer_norm_epsilon": c.layer_norm_eps, "activation_function": c.act_fn,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {
        f"transformer.{k}": v.contiguous().cpu() for k, v in to_gpt2_state_dict(model).items()
    }
    safetensors.torch.save_file(
        weights, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    return folder
