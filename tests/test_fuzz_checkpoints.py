"""Property-based fuzzing of the checkpoint files resid reads: ``config.json`` (GPT-2's and
Llama's) and safetensors headers.

Every example must end in ``CheckpointError`` or in a model, within a time and memory
bound, and must leave the checkpoint folder exactly as it was (no file changed, added or
removed). Memory is the process's peak resident set over the example (Linux's VmHWM,
reset before each example), so tensors count, not only Python objects.

The budget is RESID_FUZZ_EXAMPLES examples a property (default 25): set it higher for a
longer run, e.g. ``RESID_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_checkpoints.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import resid
from resid import CheckpointError

FUZZ = fuzz_settings(HealthCheck.function_scoped_fixture)
SECONDS = 5  # per example (a tiny model loads in a fraction of that)
PEAK_BYTES = 300 << 20  # resident memory over the example's start


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_bounded(folder: Path) -> str:
    """Load ``folder``: "ok" or "error"; anything else (another exception, too slow, too
    much memory, a file changed) fails the test."""
    before = snapshot(folder)
    measured = _reset_peak()
    start_rss = _status("VmRSS")
    start = time.monotonic()
    try:
        resid.load(folder, device="cpu")
        outcome = "ok"
    except CheckpointError:
        outcome = "error"
    seconds = time.monotonic() - start
    assert seconds < SECONDS, f"took {seconds:.1f} s"
    if measured and start_rss is not None:
        extra = _status("VmHWM") - start_rss
        assert extra < PEAK_BYTES, f"peak resident memory grew by {extra / 2**20:.0f} MiB"
    assert snapshot(folder) == before, "a file in the checkpoint folder changed"
    return outcome


@pytest.fixture(scope="module")
def bases(tiny_dir, tmp_path_factory):
    """Two valid checkpoint folders: GPT-2 (the session's tiny one) and a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = tmp_path_factory.mktemp("fuzz-llama")
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            vocab_size=64,
            max_position_embeddings=32,
        )  # fmt: skip
    ).save_pretrained(llama)
    return {"gpt2": Path(tiny_dir), "llama": llama}


# ---- config.json -------------------------------------------------------------------------

KEYS = ["model_type", "n_layer", "n_head", "n_embd", "n_inner", "vocab_size", "n_positions",
        "layer_norm_epsilon", "activation_function", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_size", "intermediate_size", "max_position_embeddings",
        "rms_norm_eps", "hidden_act", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
        "use_sliding_window", "max_window_layers", "rotary_pct", "num_layers", "num_heads",
        "attention_layers", "window_size", "use_parallel_residual", "architectures"]  # fmt: skip
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 16, 32, 64, 10**6, 10**9, 10**12, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "llama",
            "gpt2",
            "mistral",
            "qwen2",
            "gpt_neo",
            "gpt_neox",
            "bert",
            "silu",
            "gelu",
            "local",
            "global",
            "llama3",
            "dynamic",
        ]
    ),  # fmt: skip
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.sampled_from(KEYS + ["type", "factor"]), inner, max_size=5),
    ),
    max_leaves=12,
)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


CONFIG_EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KEYS), VALUES),
        st.tuples(st.just("drop"), st.sampled_from(KEYS), st.none()),
        st.tuples(
            st.just("text"),
            st.none(),
            st.one_of(
                st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                st.integers(1, 100_000).map(_deep),
                VALUES.map(json.dumps),
            ),
        ),
    ),  # fmt: skip
    min_size=1,
    max_size=4,
)


@FUZZ
@given(family=st.sampled_from(["gpt2", "llama"]), edits=CONFIG_EDITS)
def test_malformed_config_json(bases, family, edits):
    base = bases[family]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for f in base.iterdir():
            if f.name != "config.json":
                (folder / f.name).symlink_to(f)  # the weights: never copied, never changed
        config = json.loads((base / "config.json").read_text())
        text = None
        for kind, key, value in edits:
            if kind == "set":
                config[key] = value
            elif kind == "drop":
                config.pop(key, None)
            else:
                text = value
        (folder / "config.json").write_text(
            text if text is not None else json.dumps(config, allow_nan=True)
        )
        load_bounded(folder)


# ---- safetensors headers -----------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
          "F4", "Q4", "", "f32"]  # fmt: skip
DIMS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**40, 2**62, 2**64]))
HEADER_EDITS = st.lists(
    st.one_of(
        st.tuples(
            st.just("dtype"), st.integers(0, 10**6), st.one_of(st.sampled_from(DTYPES), VALUES)
        ),
        st.tuples(
            st.just("shape"), st.integers(0, 10**6), st.one_of(st.lists(DIMS, max_size=9), VALUES)
        ),
        st.tuples(
            st.just("offsets"), st.integers(0, 10**6), st.one_of(st.lists(DIMS, max_size=3), VALUES)
        ),
        st.tuples(
            st.just("drop_field"),
            st.integers(0, 10**6),
            st.sampled_from(["dtype", "shape", "data_offsets"]),
        ),
        st.tuples(st.just("entry"), st.text(max_size=30), VALUES),
        st.tuples(st.just("length"), st.none(), st.integers(0, 2**64 - 1)),
        st.tuples(st.just("truncate"), st.none(), st.floats(0, 1)),
        st.tuples(
            st.just("header"),
            st.none(),
            st.one_of(
                st.binary(max_size=300), st.integers(1, 100_000).map(lambda n: _deep(n).encode())
            ),
        ),
    ),  # fmt: skip
    min_size=1,
    max_size=4,
)


def _mutated(raw: bytes, edits) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    length, cut, replaced = None, None, None
    for kind, where, value in edits:
        if kind in ("dtype", "shape", "offsets", "drop_field"):
            entry = header.get(names[where % len(names)])
            if isinstance(entry, dict):
                if kind == "drop_field":
                    entry.pop(value, None)
                else:
                    entry[{"offsets": "data_offsets"}.get(kind, kind)] = value
        elif kind == "entry":
            header[where] = value
        elif kind == "length":
            length = value
        elif kind == "truncate":
            cut = value
        else:
            replaced = value
    head = replaced if replaced is not None else json.dumps(header, allow_nan=True).encode()
    out = struct.pack("<Q", len(head) if length is None else length) + head + body
    return out[: int(len(out) * cut)] if cut is not None else out


@FUZZ
@given(family=st.sampled_from(["gpt2", "llama"]), edits=HEADER_EDITS)
def test_malformed_safetensors_header(bases, family, edits):
    base = bases[family]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(base / "config.json", folder / "config.json")
        raw = (base / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(_mutated(raw, edits))
        load_bounded(folder)


def test_the_unmutated_bases_load(bases):
    """The fuzzers start from checkpoints that load (so a refusal is the mutation's doing)."""
    for folder in bases.values():
        assert load_bounded(folder) == "ok"
