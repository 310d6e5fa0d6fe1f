"""Property-based fuzzing of what resid reads and writes for SAEs: malformed ``cfg.json``
files, malformed safetensors headers and hostile output folders. Every example must end
in success or resid's own error (``SAEError``; ``ForeignFilesError`` for a folder resid
will not replace) within a time bound, without growing the process' memory by much, and
without touching any file the run did not write.

The budget is ``RESID_FUZZ_EXAMPLES`` examples per property (default 25); set it higher
for a long run: ``RESID_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_sae.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fuzzing import EXAMPLES, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import resid
from resid.core.files import ForeignFilesError
from resid.sae import SAE, SAEConfig, SAEError

DATA = Path(__file__).parent / "data" / "sae"
SECONDS = 5.0  # per example
MEMORY = 512 << 20  # bytes the peak RSS may grow by over a whole property
FUZZ = fuzz_settings(HealthCheck.data_too_large)
VALID = json.loads((DATA / "jumprelu" / "cfg.json").read_text())

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "d_in", "d_sae", "architecture", "k", "dtype", "apply_b_dec_to_input",
    "normalize_activations", "reshape_activations", "rescale_acts_by_decoder_norm",
    "activation_fn", "activation_fn_str", "activation_fn_kwargs", "metadata", "hook_name",
    "hook_point", "hook_head_index",
]  # fmt: skip
INTERESTING = st.sampled_from(
    [0, -1, 1, 16, 64, 2**31, 10**12, True, "16", 16.0, None, [], {}, "topk", "jumprelu",
     "gated", "standard", "float16", "torch.bfloat16", "int8", "layer_norm", "hook_z",
     "blocks.0.hook_resid_pre", "x" * 300, "\udcff"]
)  # fmt: skip


@st.composite
def cfg_texts(draw) -> str | bytes:
    """A cfg.json: a valid config with fields changed, removed or added; any JSON value;
    deeply nested JSON; or bytes that are hardly JSON at all."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "any", "deep", "bytes"]))
    if kind == "any":
        return json.dumps(draw(json_values))
    if kind == "deep":
        depth = draw(st.integers(1, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        where = draw(st.sampled_from(["metadata", "d_in", "architecture"]))
        inner = opener * depth + "1" + closer * depth
        return json.dumps({**VALID, where: 0})[:-1] + f', "{where}": {inner}}}'
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    cfg = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(["set", "set", "drop", "meta"]))
        value = draw(INTERESTING | json_values)
        if action == "drop":
            cfg.pop(field, None)
            if isinstance(cfg.get("metadata"), dict):
                cfg["metadata"].pop(field, None)
        elif action == "meta" and isinstance(cfg.get("metadata"), dict):
            cfg["metadata"][field] = value
        else:
            cfg[field] = value
    return json.dumps(cfg, ensure_ascii=draw(st.booleans()))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and the hash of its bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Bounded:
    """Checks that each example ends in time and the property's memory stays bounded."""

    def __init__(self):
        self.start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def run(self, fn):
        start = time.perf_counter()
        try:
            return fn()
        finally:
            assert time.perf_counter() - start < SECONDS
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_rss
            assert grown < MEMORY, f"peak memory grew by {grown / 2**20:.0f} MiB"


def load_outcome(folder: Path, bounded: Bounded) -> str:
    try:
        sae = bounded.run(lambda: resid.sae.load(folder))
    except SAEError:
        return "error"
    assert isinstance(sae, SAE)
    return "ok"


def load_with_file_replaced(name: str, data: bytes) -> str:
    """Load a copy of the JumpReLU fixture whose file ``name`` holds ``data``, a victim
    file beside it: in time and memory, and no file changed, moved or deleted."""
    bounded = Bounded()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "sae"
        shutil.copytree(DATA / "jumprelu", folder)
        (folder / name).write_bytes(data)
        (root / "victim.txt").write_text("not resid's")
        before = snapshot(root)
        outcome = load_outcome(folder, bounded)
        assert snapshot(root) == before  # reading wrote, moved or deleted nothing
    return outcome


@FUZZ
@given(text=cfg_texts())
def test_malformed_cfg_json_is_an_sae_error_or_loads(text):
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    load_with_file_replaced("cfg.json", data)


header_values = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "BOOL", "F8_E4M3", "U8",
                                  "X", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | json_values,
    },
)  # fmt: skip
names = st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec", "threshold", "__metadata__", "x"])


@st.composite
def weight_files(draw) -> bytes:
    """A safetensors file: a real one with header entries changed, a header of any JSON,
    a header length that lies, or random bytes."""
    real = (DATA / "jumprelu" / "sae_weights.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", real[:8])
    header, body = json.loads(real[8 : 8 + n]), real[8 + n :]
    kind = draw(st.sampled_from(["edit", "edit", "any", "length", "bytes", "truncate"]))
    if kind == "edit":
        for _ in range(draw(st.integers(1, 3))):
            name = draw(names)
            if draw(st.booleans()) and isinstance(header.get(name), dict):
                header[name].update(draw(header_values))
            else:
                header[name] = draw(header_values | json_values)
    elif kind == "any":
        header = draw(json_values)
    elif kind == "length":
        text = json.dumps(header).encode()
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + text + body
    elif kind == "bytes":
        return draw(st.binary(max_size=300))
    else:
        return real[: draw(st.integers(0, len(real) - 1))]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@FUZZ
@given(data=weight_files())
def test_malformed_weights_are_an_sae_error_or_load(data):
    load_with_file_replaced("sae_weights.safetensors", data)


entry_names = st.sampled_from(
    ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "resid-manifest.json",
     "notes.txt", "sub/x.bin", ".hidden"]
)  # fmt: skip


@st.composite
def output_folders(draw) -> dict:
    """What an output folder might already hold: nothing, files of any name and bytes, a
    manifest (resid's or forged: paths that climb out, absolute paths, hashes of files
    outside), or a symlink."""
    files = draw(st.dictionaries(entry_names, st.binary(max_size=40), max_size=4))
    manifest = None
    if draw(st.booleans()):
        listed = draw(
            st.dictionaries(
                st.sampled_from(["../victim.txt", "/etc/passwd", "notes.txt", "cfg.json",
                                 "sub/../../victim.txt", "", "."]) | st.text(max_size=12),
                st.sampled_from([hashlib.sha256(b"not resid's").hexdigest(), "0" * 64])
                | st.text(max_size=10),
                max_size=4,
            )
        )  # fmt: skip
        writer = draw(st.sampled_from(["resid.sae.save", "resid.save", "someone"]))
        manifest = {"writer": writer, "files": listed}
        if draw(st.booleans()):
            manifest = draw(json_values)
    return {"files": files, "manifest": manifest, "link": draw(st.booleans())}


@FUZZ
@given(existing=output_folders())
def test_saving_over_any_folder_deletes_nothing_it_did_not_write(existing):
    bounded = Bounded()
    sae = SAE(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_pre"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        out.mkdir()
        for rel, data in existing["files"].items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        if existing["manifest"] is not None:
            (out / "resid-manifest.json").write_text(json.dumps(existing["manifest"]))
        if existing["link"]:
            (out / "link").symlink_to(root / "victim.txt")
        (root / "victim.txt").write_text("not resid's")
        before = snapshot(root)
        try:
            bounded.run(lambda: resid.sae.save(sae, out))
        except ForeignFilesError:
            assert snapshot(root) == before  # refused: everything as it was
            return
        # written: every file that was there was provably an earlier resid.sae.save's (the
        # manifest, and files it lists with their hashes), and the victim is intact
        victim = str(root / "victim.txt")
        manifest = existing["manifest"]
        owned = {str(out / "resid-manifest.json")}
        if isinstance(manifest, dict) and manifest.get("writer") == "resid.sae.save":
            listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
            owned |= {str(out / rel) for rel, digest in listed.items() if isinstance(rel, str)
                      and before.get(str(out / rel)) == digest}  # fmt: skip
        else:
            owned = set()
        assert set(before) - {victim} <= owned
        assert (root / "victim.txt").read_text() == "not resid's"
        assert torch.equal(resid.sae.load(out).W_enc, sae.W_enc)


def test_the_fuzz_budget_comes_from_the_environment():
    assert FUZZ.max_examples == EXAMPLES == int(os.environ.get("RESID_FUZZ_EXAMPLES", "25")) >= 1


@pytest.mark.parametrize("depth", [10_000, 1_000_000])
def test_nesting_far_past_the_recursion_limit(tmp_path, depth):
    """The fuzzer's deep case, at a depth it may not draw."""
    folder = tmp_path / "sae"
    shutil.copytree(DATA / "jumprelu", folder)
    (folder / "cfg.json").write_text('{"metadata": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(SAEError):
        resid.sae.load(folder)
