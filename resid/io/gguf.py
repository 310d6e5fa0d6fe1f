"""GGUF files (llama.cpp's format): a model's weights, config and tokenizer in one file.

>>> model = resid.load("SmolLM2-135M-Instruct.Q4_1.gguf")     # resid.load dispatches here
>>> model = load_gguf("model.gguf", dtype=torch.bfloat16)
>>> hf_config, weights, tokenizer = read_hf("model.gguf")       # transformers' names and layouts

A GGUF file is a header (metadata keys and values, then one record per tensor: name, shape,
type, offset) followed by the tensor data. The header is parsed here in full, every count,
length and shape bounded and every tensor's extent checked against the file's length, and
the tensors are checked against the shapes the metadata implies, before any tensor is
dequantised. Data is read from a memory map and dequantised by the ``gguf`` package (every
type it can dequantise), one tensor at a time, straight into the dtype asked.

The ``llama`` and ``gpt2`` architectures are mapped onto resid's families through a
Hugging Face config dict and Hugging Face tensor names. Two layout facts: llama.cpp stores
each head's query and key rows interleaved for its rotary kernel (row pairs ``(i, i + d/2)``
side by side), which are put back in Hugging Face's half-split order here, as transformers'
GGUF loader does; and a GPT-2 file stores its linear layers as ``nn.Linear`` ``[out, in]``,
transposed here to GPT-2's ``Conv1D`` ``[in, out]``. The tokenizer is built from the file's
own vocabulary, merges and special tokens by ``resid.io.gguf_tokenizer``.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from resid.core.model import Model
from resid.core.tokenizer import Tokenizer
from resid.io.checkpoint import require_regular
from resid.io.convert import from_hf
from resid.io.errors import CheckpointError
from resid.io.gguf_tokenizer import tokenizer_from_metadata

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023) used 32-bit counts; llama.cpp itself no longer reads it
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_ARRAY = 1 << 24  # elements in one metadata array (vocabularies are ~10^5)
MAX_STRING = 1 << 24  # bytes in one metadata string (chat templates are ~10^4)
MAX_NAME = 1024  # bytes in a tensor name (llama.cpp's limit is 64)
MAX_DIMS = 4
MAX_DIM = 1 << 40
MAX_NESTING = 2  # arrays of arrays, no deeper
MAX_LAYERS, MAX_WIDTH, MAX_CTX = 4096, 1 << 17, 1 << 22  # bounds on metadata that sizes a model
# GGUF metadata value types: id -> (struct format, numpy dtype); 8 is a string, 9 an array
SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
           4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<B", "<u1"),
           10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}  # fmt: skip
STRING, ARRAY, BOOL = 8, 9, 7
INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # GGML types that hold integers, not weights


def _gguf():
    """The ``gguf`` package (the ``resid[gguf]`` extra), imported when a file is read, so
    that ``resid.io`` imports without it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading GGUF files needs the gguf package: pip install 'resid[gguf]'"
        ) from e
    return gguf


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header record: its numpy-order ``shape`` (GGUF lists dims innermost
    first), its GGML type, and where its bytes are in the file."""

    name: str
    shape: tuple[int, ...]
    type: Any  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    """A GGUF file's parsed and checked header."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    file_size: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path} has no 'general.architecture' string")
        return arch


class _Reader:
    """Bounded little-endian reads from the file's bytes; running past the end is an error
    naming what was being read."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise CheckpointError(
                f"{self.path} ends inside its header (reading {what} at byte {self.pos:,} "
                f"of {self.size:,}): the file is truncated or not GGUF"
            )

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        if n > limit:
            raise CheckpointError(
                f"{self.path}: {what} claims {n:,} bytes (the limit is {limit:,}): corrupt"
            )
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8 ({e})") from None

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in SCALARS:
            value = self.scalar(SCALARS[kind][0], what)
            if kind == BOOL:
                if value > 1:
                    raise CheckpointError(f"{self.path}: {what} is a bool of value {value}")
                return bool(value)
            return value
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            raise CheckpointError(f"{self.path}: {what} has the unknown value type {kind}")
        if depth >= MAX_NESTING:
            raise CheckpointError(f"{self.path}: {what} nests arrays more than {MAX_NESTING} deep")
        item = self.scalar("<I", f"the element type of {what}")
        count = self.scalar("<Q", f"the length of {what}")
        smallest = struct.calcsize(SCALARS[item][0]) if item in SCALARS else 8
        if count > MAX_ARRAY or count * smallest > self.size - self.pos:
            raise CheckpointError(
                f"{self.path}: {what} claims {count:,} elements, more than "
                f"{'the file holds' if count <= MAX_ARRAY else f'the limit of {MAX_ARRAY:,}'}"
            )
        if item in SCALARS:  # one read for the whole array
            dtype = np.dtype(SCALARS[item][1])
            out = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += count * dtype.itemsize
            if item == BOOL:
                if out.size and out.max() > 1:
                    raise CheckpointError(f"{self.path}: {what} holds a bool that is not 0 or 1")
                return out.astype(bool).tolist()
            return out.tolist()
        return [self.value(item, f"{what}[{i}]", depth + 1) for i in range(count)]


def read_header(path: str | Path) -> Header:
    """Parse and check a GGUF file's header; no tensor data is read.

    Every count, string and array length is bounded, every tensor's type must be one the
    ``gguf`` package can dequantise (to a float) and every tensor's bytes must lie inside
    the file, aligned and not overlapping another's. Raises ``CheckpointError`` naming the
    problem.

    >>> read_header("model.gguf").metadata["general.architecture"]
    'llama'
    """
    path = Path(path)
    size = require_regular(path, "GGUF file").st_size
    if size < 24:
        raise CheckpointError(f"{path} is {size} bytes: too short to be a GGUF file")
    with open(path, "rb") as f:
        mapped = np.memmap(f, dtype=np.uint8, mode="r")
    r = _Reader(memoryview(mapped), path)
    if bytes(r.buf[:4]) != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it does not start with b'GGUF'")
    r.pos = 4
    version = r.scalar("<I", "the version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file)" if swapped in VERSIONS else ""
        raise CheckpointError(
            f"{path} is GGUF version {version}{hint}: resid reads little-endian versions 2 and 3"
        )
    n_tensors = r.scalar("<Q", "the tensor count")
    n_keys = r.scalar("<Q", "the metadata count")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise CheckpointError(
            f"{path} claims {n_tensors:,} tensors and {n_keys:,} metadata keys (limits "
            f"{MAX_TENSORS:,} and {MAX_KEYS:,}): the header is corrupt"
        )
    metadata: dict[str, Any] = {}
    for i in range(n_keys):
        key = r.string(f"metadata key {i}", MAX_NAME)
        if key in metadata:
            raise CheckpointError(f"{path}: the metadata key {key!r} appears twice")
        metadata[key] = r.value(r.scalar("<I", f"the type of {key!r}"), repr(key))
    records = []
    for i in range(n_tensors):
        name = r.string(f"tensor name {i}", MAX_NAME)
        n_dims = r.scalar("<I", f"the rank of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4)")
        dims = [r.scalar("<Q", f"the shape of {name!r}") for _ in range(n_dims)]
        if not all(1 <= d <= MAX_DIM for d in dims):
            raise CheckpointError(f"{path}: tensor {name!r} has the impossible shape {dims}")
        records.append((name, dims, r.scalar("<I", f"the type of {name!r}"),
                        r.scalar("<Q", f"the offset of {name!r}")))  # fmt: skip
    align = metadata.get("general.alignment", 32)
    if (
        not isinstance(align, int)
        or isinstance(align, bool)
        or not 1 <= align <= 1 << 16
        or (align & (align - 1))
    ):
        raise CheckpointError(f"{path}: general.alignment {align!r} is not a power of two")
    start = -(-r.pos // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, kind, offset in records:
        info = _tensor_info(path, name, dims, kind, offset, start, align, size)
        if name in tensors:
            raise CheckpointError(f"{path}: the tensor {name!r} appears twice")
        tensors[name] = info
    end = start
    for info in sorted(tensors.values(), key=lambda t: t.offset):
        if info.offset < end:
            raise CheckpointError(f"{path}: the data of tensor {info.name!r} overlaps another's")
        end = info.offset + info.n_bytes
    return Header(path, version, metadata, tensors, size)


def _tensor_info(path, name, dims, kind, offset, start, align, size) -> TensorInfo:
    try:
        qtype = _gguf().GGMLQuantizationType(kind)
    except ValueError:
        raise CheckpointError(f"{path}: tensor {name!r} has the unknown GGML type {kind}") from None
    if qtype.name in INTEGER_TYPES or not _dequantisable(qtype):
        raise CheckpointError(
            f"{path}: tensor {name!r} is stored as {qtype.name}, which the installed gguf "
            "package cannot dequantise to floats (upgrade gguf, or convert the file)"
        )
    block, block_bytes = _gguf().GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise CheckpointError(
            f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of "
            f"{qtype.name}'s blocks of {block}"
        )
    n_bytes = math.prod(dims) // block * block_bytes
    if offset % align or start + offset + n_bytes > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({qtype.name}, {n_bytes:,} bytes at offset {offset:,}) "
            f"{'is not aligned' if offset % align else 'runs past the end of the file'}: "
            f"the file is {'corrupt' if offset % align else 'truncated'}"
        )
    return TensorInfo(name, tuple(reversed(dims)), qtype, start + offset, n_bytes)


@cache
def _dequantisable(qtype) -> bool:
    """Whether the installed ``gguf`` dequantises ``qtype`` (tried on one block of zeros)."""
    if qtype.name == "F64":
        return True
    _, block_bytes = _gguf().GGML_QUANT_SIZES[qtype]
    try:
        _gguf().quants.dequantize(np.zeros((1, block_bytes), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return False
    return True


def _dequantise(data: np.ndarray, info: TensorInfo, dtype: torch.dtype) -> Tensor:
    """One tensor, dequantised by ``gguf`` and converted to ``dtype`` (a copy, off the map)."""
    raw = data[info.offset : info.offset + info.n_bytes]
    if info.type.name == "F64":
        values = raw.view(np.float64)
    else:  # gguf wants [rows, bytes per row] and gives [rows, values per row]
        rows = raw.reshape(math.prod(info.shape[:-1]), -1)
        values = _gguf().quants.dequantize(rows, info.type)
    if not values.flags.writeable:  # a view of the map (F32, F64): copy it off
        values = values.copy()
    return torch.from_numpy(values.reshape(info.shape)).to(dtype)


# ---- the metadata as a Hugging Face config -----------------------------------------------


def _int(h: Header, key: str, default: int | None = None, high: int = MAX_WIDTH) -> int:
    value = h.metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        got = "missing" if key not in h.metadata else repr(value)
        raise CheckpointError(f"{h.path}: {key} must be an integer in [1, {high:,}], not {got}")
    return value


def _float(h: Header, key: str, default: float) -> float:
    value = h.metadata.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise CheckpointError(f"{h.path}: {key} must be a positive number, not {value!r}")
    return float(value)


def hf_config(h: Header) -> dict:
    """The Hugging Face config a GGUF file's metadata describes (``llama`` or ``gpt2``)."""
    arch, t = h.architecture, h.tensors
    p = f"{arch}."
    vocab = t["token_embd.weight"].shape[0] if "token_embd.weight" in t else None
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    n_vocab = _int(h, p + "vocab_size", len(tokens) if isinstance(tokens, list) else vocab,
                   high=1 << 24)  # fmt: skip
    common = {"vocab_size": n_vocab, "tie_word_embeddings": "output.weight" not in t}
    d, layers = _int(h, p + "embedding_length"), _int(h, p + "block_count", high=MAX_LAYERS)
    heads = _int(h, p + "attention.head_count", high=d)
    ffn = _int(h, p + "feed_forward_length", high=1 << 20)
    ctx = _int(h, p + "context_length", 2048, high=MAX_CTX)
    if arch == "gpt2":
        eps = _float(h, p + "attention.layer_norm_epsilon", 1e-5)
        return {"model_type": "gpt2", "n_layer": layers, "n_head": heads, "n_embd": d,
                "n_inner": ffn, "n_positions": ctx, "layer_norm_epsilon": eps,
                "activation_function": "gelu_new", **common}  # fmt: skip
    if arch != "llama":
        raise CheckpointError(
            f"{h.path} is a GGUF of the {arch!r} architecture: resid reads 'llama' and 'gpt2'"
        )
    d_head = _int(h, p + "attention.key_length", d // heads, high=d)
    rotary = _int(h, p + "rope.dimension_count", d_head, high=d)
    if rotary != d_head:
        raise CheckpointError(f"{h.path}: rotary over {rotary} of {d_head} head dimensions")
    scaling = h.metadata.get(p + "rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in t:
        raise CheckpointError(
            f"{h.path} scales its rotary embedding ({scaling!r}, or per-frequency factors): "
            "resid reads GGUF files with plain rotary only"
        )
    return {
        "model_type": "llama", "hidden_size": d, "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _int(h, p + "attention.head_count_kv", heads, high=heads),
        "head_dim": d_head, "intermediate_size": ffn, "max_position_embeddings": ctx,
        "rms_norm_eps": _float(h, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _float(h, p + "rope.freq_base", 10000.0), "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in t, **common,
    }  # fmt: skip


# ---- tensor names and layouts --------------------------------------------------------------

# GGUF name -> (Hugging Face name, transposed to Conv1D); "{i}" is the block
GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}": f"transformer.h.{{i}}.{n}" for g, n in {
        "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
        "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
        "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
        "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
        "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
        "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias"}.items()},
}  # fmt: skip
GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}": f"model.layers.{{i}}.{n}" for g, n in {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight"}.items()},
}  # fmt: skip


def expected_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a model of this config has, with its numpy-order shape (optional
    ones, ``output.weight`` and llama's attention biases, included only where the config
    says they are there)."""
    if hf["model_type"] == "gpt2":
        d, m, L = hf["n_embd"], hf["n_inner"], hf["n_layer"]
        outer = {"token_embd.weight": (hf["vocab_size"], d), "position_embd.weight": (hf["n_positions"], d),
                 "output_norm.weight": (d,), "output_norm.bias": (d,)}  # fmt: skip
        block = {"attn_norm.weight": (d,), "attn_norm.bias": (d,), "attn_qkv.weight": (3 * d, d),
                 "attn_qkv.bias": (3 * d,), "attn_output.weight": (d, d), "attn_output.bias": (d,),
                 "ffn_norm.weight": (d,), "ffn_norm.bias": (d,), "ffn_up.weight": (m, d),
                 "ffn_up.bias": (m,), "ffn_down.weight": (d, m), "ffn_down.bias": (d,)}  # fmt: skip
    else:
        d, m, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
        q, kv = (
            hf["num_attention_heads"] * hf["head_dim"],
            hf["num_key_value_heads"] * hf["head_dim"],
        )
        outer = {"token_embd.weight": (hf["vocab_size"], d), "output_norm.weight": (d,)}
        block = {"attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_q.weight": (q, d),
                 "attn_k.weight": (kv, d), "attn_v.weight": (kv, d), "attn_output.weight": (d, q),
                 "ffn_gate.weight": (m, d), "ffn_up.weight": (m, d), "ffn_down.weight": (d, m)}  # fmt: skip
        if hf["attention_bias"]:
            block |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
                      "attn_output.bias": (d,)}  # fmt: skip
    if not hf["tie_word_embeddings"]:
        outer["output.weight"] = (hf["vocab_size"], d)
    return outer | {f"blk.{i}.{k}": s for i in range(L) for k, s in block.items()}


def _check_tensors(h: Header, shapes: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in shapes if k not in h.tensors]
    unexpected = [k for k in h.tensors if k not in shapes]
    misshaped = [f"{k}: expected {list(s)}, got {list(h.tensors[k].shape)}"
                 for k, s in shapes.items() if k in h.tensors and h.tensors[k].shape != s]  # fmt: skip
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"
                 for label, keys in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                     ("mis-shaped tensors", misshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"{h.path} does not fit the {h.architecture} its metadata describes:\n  "
            + "\n  ".join(parts)
        )


def _hf_name(name: str, table: dict[str, str]) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return table[name]
    return table["blk.{i}." + m.group(2)].format(i=m.group(1))


def unpermute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Query or key rows (``[heads * d_head, ...]``) from llama.cpp's interleaved rotary order
    back to Hugging Face's: within each head, row ``2j`` came from ``j`` and ``2j + 1``
    from ``j + d_head / 2``.

    >>> unpermute_rotary(torch.arange(4.0)[:, None], 1).flatten()
    tensor([0., 2., 1., 3.])
    """
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def read_hf(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[dict, dict[str, Tensor], Tokenizer | None]:
    """``(config, weights, tokenizer)`` of a GGUF file, as transformers names and lays them
    out (``nn.Linear`` ``[out, in]``; GPT-2's ``Conv1D`` ``[in, out]``), dequantised into
    ``dtype`` (default float32). Everything is checked before the first tensor is read.

    >>> config, weights, tokenizer = read_hf("model.gguf")
    >>> config["model_type"], weights["model.embed_tokens.weight"].shape
    ('llama', torch.Size([49152, 576]))
    """
    h = read_header(path)
    hf = hf_config(h)
    _check_tensors(h, expected_shapes(hf))
    tokenizer = tokenizer_from_metadata(h.metadata, h.path, hf["vocab_size"])
    dtype = dtype or torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, not {dtype}")
    llama = hf["model_type"] == "llama"
    table = LLAMA_NAMES if llama else GPT2_NAMES
    with open(h.path, "rb") as f:
        data = np.memmap(f, dtype=np.uint8, mode="r")
    weights = {}
    for name, info in h.tensors.items():
        w = _dequantise(data, info, dtype)
        if llama and ".attn_q." in name:
            w = unpermute_rotary(w, hf["num_attention_heads"])
        elif llama and ".attn_k." in name:
            w = unpermute_rotary(w, hf["num_key_value_heads"])
        elif not llama and name.endswith(GPT2_TRANSPOSED):
            w = w.T.contiguous()
        weights[_hf_name(name, table)] = w
    del data
    if tokenizer is not None:
        hf |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return hf, weights, tokenizer


def load_gguf(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_nonfinite: bool = False,
) -> Model:
    """A ``Model`` with a GGUF file's weights (dequantised into ``dtype``, default float32)
    and the tokenizer its metadata describes. ``resid.load("x.gguf")`` calls this.

    >>> model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> model.generate("The capital of France is", 8, temperature=0)
    """
    hf, weights, tokenizer = read_hf(path, dtype)
    return from_hf(hf, weights, tokenizer=tokenizer, dtype=dtype or torch.float32,
                   device=device, source=str(path), allow_nonfinite=allow_nonfinite)  # fmt: skip
