"""Transcoders on disk: circuit-tracer's per-layer format and SAELens' transcoder format.

circuit-tracer (0.5) keeps a transcoder set as a folder: ``config.yaml`` (``model_kind:
transcoder_set``, ``feature_input_hook``, ``feature_output_hook`` relative to a block,
``transcoders:`` one file per layer) and ``layer_{i}.safetensors`` holding ``W_enc
[d_sae, d_model]``, ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``, optionally
``W_skip [d_model, d_model]`` (the skip is ``x @ W_skip.T``) and
``activation_function.threshold`` (JumpReLU). SAELens keeps one transcoder per folder:
``cfg.json`` (``architecture`` ``transcoder`` / ``skip_transcoder`` /
``jumprelu_transcoder``, ``d_in``, ``d_sae``, ``d_out``, ``hook_name``, ``hook_name_out``)
and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``,
``W_skip [d_out, d_in]``, ``threshold``). Everything is checked (sizes, shapes, finite
values, paths confined to the folder) before a tensor is allocated.

>>> tcs = load_transcoders("path/to/transcoders")     # a list, one per layer
>>> save_transcoders(tcs, "out/transcoders")          # circuit-tracer's format
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from resid.core import files
from resid.core.protocols import ModelLike
from resid.sae.config import SAEError, parse_json, show
from resid.sae.transcoder import Transcoder, TranscoderConfig

WRITER = "resid.sae.save_transcoders"
CONFIG = "config.yaml"
MAX_LAYERS = 1024
MAX_YAML = 1 << 20
# circuit-tracer names its sites relative to a block; resid's full names are these
CT_SITES = {
    "hook_resid_mid": "hook_resid_mid",
    "ln2.hook_normalized": "ln2.hook_normalized",
    "hook_mlp_in": "hook_mlp_in",
    "hook_mlp_out": "hook_mlp_out",
}


def load_transcoders(
    path: str | Path, dtype: torch.dtype = torch.float32, model: ModelLike | None = None
) -> list[Transcoder]:
    """The transcoders in ``path``: a circuit-tracer folder (``config.yaml`` or
    ``layer_{i}.safetensors`` files, read as MLP-input-to-``hook_mlp_out`` transcoders of
    ``ln2.hook_normalized`` unless the config says otherwise) or a SAELens transcoder
    folder (``cfg.json``). A list, by layer. circuit-tracer's ``mlp.hook_in`` (the MLP's
    input, after ``ln2``'s gain and bias: Llama-family transcoders) needs ``model``: the
    gain and bias of each ``ln2`` are folded into the encoder (and skip), exactly, and the
    transcoder reads ``ln2.hook_normalized``.

    >>> tcs = resid.sae.load_transcoders("transcoders/")
    """
    folder = Path(path)
    if not folder.is_dir():
        raise SAEError(f"{folder} is not a folder of transcoders (circuit-tracer's or SAELens')")
    if (folder / "cfg.json").is_file():
        return [_load_saelens(folder, dtype)]
    if (folder / CONFIG).is_file():
        cfg = _read_yaml(folder / CONFIG)
        kind = cfg.get("model_kind", "transcoder_set")
        if kind != "transcoder_set":
            raise SAEError(
                f"{folder / CONFIG}: model_kind {show(kind)} is not supported (resid reads "
                "per-layer transcoder sets; cross-layer transcoders are not supported)"
            )
        read = "ln2.hook_normalized"  # circuit-tracer's default
        fold = cfg.get("feature_input_hook") == "mlp.hook_in"
        if fold and model is None:
            raise SAEError(
                f"{folder / CONFIG}: these transcoders read mlp.hook_in (after ln2's gain): "
                "pass model= to load_transcoders to fold the gain into them"
            )
        read = "ln2.hook_normalized" if fold else _site(cfg.get("feature_input_hook", read), folder)
        write = _site(cfg.get("feature_output_hook", "hook_mlp_out"), folder)
        paths = cfg.get("transcoders")
        if not isinstance(paths, list) or not 0 < len(paths) <= MAX_LAYERS:
            raise SAEError(f"{folder / CONFIG}: 'transcoders' must list one file per layer")
        layer_files = [files.inside(folder, p, "a transcoder file") for p in paths]
    else:
        read, write, fold = "ln2.hook_normalized", "hook_mlp_out", False
        layer_files = []
        while (folder / f"layer_{len(layer_files)}.safetensors").is_file():
            layer_files.append(folder / f"layer_{len(layer_files)}.safetensors")
            if len(layer_files) > MAX_LAYERS:
                raise SAEError(f"{folder}: more than {MAX_LAYERS} layers")
        if not layer_files:
            raise SAEError(
                f"{folder} holds neither cfg.json (SAELens), config.yaml nor layer_0.safetensors "
                "(circuit-tracer): it is not a folder of transcoders"
            )
    tcs = [
        _load_ct_layer(p, layer, f"blocks.{layer}.{read}", f"blocks.{layer}.{write}", dtype)
        for layer, p in enumerate(layer_files)
    ]
    return [_fold_gain(t, model) for t in tcs] if fold else tcs


def _fold_gain(tc: Transcoder, model: ModelLike) -> Transcoder:
    """``tc`` read from ``ln2``'s output (``normalized * w + b``) made to read
    ``ln2.hook_normalized``: ``W_enc <- w[:, None] * W_enc``, ``b_enc += b @ W_enc``, and the
    same for a skip term (its bias into ``b_dec``)."""
    if tc.layer >= model.cfg.n_layers:
        raise SAEError(f"{tc!r} is for layer {tc.layer}; {model!r} has {model.cfg.n_layers}")
    ln = model.blocks[tc.layer].ln2
    w = ln.w.detach().to(tc.W_enc.dtype)
    b = getattr(ln, "b", None)
    b = torch.zeros_like(w) if b is None else b.detach().to(w.dtype)
    if w.shape[0] != tc.cfg.d_in:
        raise SAEError(f"{tc!r} reads width {tc.cfg.d_in}, {model!r}'s ln2 has {w.shape[0]}")
    with torch.no_grad():
        tc.b_enc += b @ tc.W_enc
        tc.W_enc.mul_(w[:, None])
        if tc.cfg.skip:
            tc.b_dec += b @ tc.W_skip
            tc.W_skip.mul_(w[:, None])
    return tc


def save_transcoders(transcoders: list[Transcoder], folder: str | Path) -> Path:
    """Write one transcoder per layer (layers 0, 1, ..., all reading one site and writing
    ``hook_mlp_out``) in circuit-tracer's format, as the folder ``folder``, whole or not
    at all (an existing folder is replaced only if empty or written by this function).

    >>> resid.sae.save_transcoders(tcs, "out/transcoders")
    """
    tcs = list(transcoders)
    if not tcs or not all(isinstance(t, Transcoder) for t in tcs):
        raise TypeError("save_transcoders writes a non-empty list of Transcoders")
    sites = {t.hook_name.split(".", 2)[2] for t in tcs}
    if [t.layer for t in tcs] != list(range(len(tcs))) or len(sites) != 1:
        raise ValueError(
            "circuit-tracer's format holds one transcoder per layer 0..n-1, all reading the "
            "same site: pass them in layer order"
        )
    if any(t.cfg.architecture == "topk" for t in tcs):
        raise ValueError("circuit-tracer's per-layer format has no top-k transcoders")
    lines = [
        "model_kind: transcoder_set",
        f"feature_input_hook: {sites.pop()}",
        "feature_output_hook: hook_mlp_out",
        "transcoders:",
    ] + [f"- layer_{t.layer}.safetensors" for t in tcs]
    with files.replace_folder(folder, WRITER, "folder", durable=True) as tmp:
        for t in tcs:
            state = {
                "W_enc": t.W_enc.detach().T,
                "W_dec": t.W_dec.detach(),
                "b_enc": t.b_enc.detach(),
                "b_dec": t.b_dec.detach(),
            }
            if t.cfg.architecture == "jumprelu":
                state["activation_function.threshold"] = t.threshold.detach()
            if t.cfg.skip:
                state["W_skip"] = t.W_skip.detach().T
            tensors = {k: v.cpu().contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / f"layer_{t.layer}.safetensors"))
        (tmp / CONFIG).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files.target(folder)


def _site(value: object, folder: Path) -> str:
    if value not in CT_SITES:
        raise SAEError(
            f"{folder / CONFIG}: the site {show(value)} is not one resid splices a transcoder "
            f"at; resid knows {', '.join(CT_SITES)} and mlp.hook_in (with model=)"
        )
    return CT_SITES[value]


def _read_yaml(path: Path) -> dict:
    """circuit-tracer's config.yaml: ``key: value`` lines and ``- item`` lists (the subset
    its configs use), without a YAML dependency."""
    text = files.read_regular(path, MAX_YAML).decode("utf-8", errors="replace")
    out: dict = {}
    key = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("- ") and key is not None:
            if not isinstance(out.get(key), list):
                out[key] = []
            out[key].append(line.lstrip()[2:].strip().strip("'\""))
        elif ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip().strip("'\"")
            out[key] = value if value else None
        else:
            raise SAEError(f"{path}: cannot read the line {show(raw)} (key: value or - item)")
    return out


def _tensors(path: Path, want: dict[str, tuple[int, ...] | None], shown: str) -> dict[str, Tensor]:
    """The tensors ``want`` names (shape ``None``: read whatever it is) from a safetensors
    file, every shape checked against the header before any is read."""
    if not path.is_file() or path.is_symlink():
        raise SAEError(f"{shown} is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            need = {k for k, s in want.items() if not k.endswith("?")}
            missing = sorted(need - keys)
            if missing:
                raise SAEError(f"{shown} lacks {', '.join(missing)}")
            out = {}
            for k, shape in want.items():
                name = k.rstrip("?")
                if name not in keys:
                    continue
                got = tuple(f.get_slice(name).get_shape())
                if shape is not None and got != shape:
                    raise SAEError(f"{shown}: {name} is {got}, not {shape}")
                if len(got) > 2 or any(d > (1 << 24) for d in got):
                    raise SAEError(f"{shown}: {name} of shape {got} is too large")
                out[name] = f.get_tensor(name)
    except SAEError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise SAEError(f"{shown} is not a safetensors file: {e}") from None
    bad = [k for k, t in out.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise SAEError(f"{shown}: {', '.join(bad)} must hold finite floats")
    return out


def _header(path: Path, shown: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header alone (nothing is read)."""
    if not path.is_file() or path.is_symlink():
        raise SAEError(f"{shown} is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise SAEError(f"{shown} is not a safetensors file: {e}") from None


def _load_ct_layer(path: Path, layer: int, read: str, write: str, dtype) -> Transcoder:
    shown = str(path)
    # the header first: b_enc and b_dec give the widths, checked (and bounded) by the config
    # before any tensor is read
    shapes = _header(path, shown)
    if len(shapes.get("b_enc", ())) != 1 or len(shapes.get("b_dec", ())) != 1:
        raise SAEError(f"{shown}: b_enc and b_dec must be vectors (circuit-tracer's format)")
    (n,), (d,) = shapes["b_enc"], shapes["b_dec"]
    jump = "activation_function.threshold" in shapes
    cfg = TranscoderConfig(
        d_in=d, d_sae=n, d_out=d, hook_name=read, hook_name_out=write,
        architecture="jumprelu" if jump else "relu", skip="W_skip" in shapes,
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    t = _tensors(
        path,
        {"W_enc": (n, d), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,),
         "W_skip?": (d, d), "activation_function.threshold?": (n,)},
        shown,
    )  # fmt: skip
    state = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if jump:
        state["threshold"] = t["activation_function.threshold"]
    if cfg.skip:
        state["W_skip"] = t["W_skip"].T
    return _built(cfg, state)


_SAELENS_ARCH = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
}


def _load_saelens(folder: Path, dtype) -> Transcoder:
    raw = parse_json(files.read_regular(folder / "cfg.json", 1 << 20), str(folder / "cfg.json"))
    if not isinstance(raw, dict):
        raise SAEError(f"{folder / 'cfg.json'} must hold a JSON object")
    arch = raw.get("architecture")
    if arch not in _SAELENS_ARCH:
        raise SAEError(
            f"{folder / 'cfg.json'}: architecture {show(arch)} is not a SAELens transcoder "
            f"({', '.join(_SAELENS_ARCH)}); load SAEs with resid.sae.load"
        )
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    kind, skip = _SAELENS_ARCH[arch]
    cfg = TranscoderConfig(
        d_in=raw.get("d_in"), d_sae=raw.get("d_sae"), d_out=raw.get("d_out"),
        hook_name=meta.get("hook_name", raw.get("hook_name")),
        hook_name_out=raw.get("hook_name_out", meta.get("hook_name_out")),
        architecture=kind, skip=skip, dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    want: dict = {k: s for k, s in cfg.shapes().items() if k != "W_skip"}
    if skip:
        want["W_skip"] = (cfg.d_out, cfg.d_in)
    t = _tensors(folder / "sae_weights.safetensors", want, str(folder / "sae_weights.safetensors"))
    if skip:
        t["W_skip"] = t["W_skip"].T
    return _built(cfg, t)


def _built(cfg: TranscoderConfig, state: dict[str, Tensor]) -> Transcoder:
    tc = Transcoder(cfg)
    with torch.no_grad():
        for k, v in state.items():
            getattr(tc, k).copy_(v)
    return tc


def saelens_cfg(tc: Transcoder) -> str:
    """SAELens' ``cfg.json`` text for ``tc`` (for tests and converters)."""
    arch = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
            ("jumprelu", False): "jumprelu_transcoder"}[(tc.cfg.architecture, tc.cfg.skip)]  # fmt: skip
    c = tc.cfg
    return json.dumps({
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "d_out": c.d_out,
        "hook_name_out": c.hook_name_out, "metadata": {"hook_name": c.hook_name},
    })  # fmt: skip


__all__ = ["load_transcoders", "save_transcoders"]
