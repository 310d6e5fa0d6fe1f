"""Property-based fuzzing of GGUF headers: a valid file with bytes or fields of its header
changed, cut short, or a header built from scratch with hostile counts, lengths, shapes,
types and offsets. Every example must end in a model or resid's own ``CheckpointError``
within a time bound and without growing the process' memory by much.

The budget is ``RESID_FUZZ_EXAMPLES`` examples per property (default 25); set it higher
for a long run: ``RESID_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_gguf.py``.
"""

from __future__ import annotations

import resource
import struct
import time

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from resid.io.errors import CheckpointError

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from test_gguf import hf_llama, write_gguf  # noqa: E402

from resid.io.gguf import load_gguf, read_header  # noqa: E402

SECONDS = 5.0  # per example
MEMORY = 512 << 20  # bytes the peak RSS may grow by over a whole property
FUZZ = fuzz_settings(HealthCheck.function_scoped_fixture)
HOSTILE = st.sampled_from([0, 1, 2, 3, 7, 31, 255, 2**16, 2**31 - 1, 2**32 - 1, 2**32,
                           2**40, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)  # fmt: skip


class Valid(tuple):
    """(bytes of a valid file, the length of its header), with a short repr for reports."""

    def __repr__(self) -> str:
        return f"<a valid GGUF of {len(self[0]):,} bytes>"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    """A valid tiny llama GGUF (Q8_0) and the length of its header."""
    path = tmp_path_factory.mktemp("fuzz") / "valid.gguf"
    write_gguf(path, hf_llama(seed=5), gguf.GGMLQuantizationType.Q8_0)
    header = read_header(path)
    first = min(t.offset for t in header.tensors.values())
    return Valid((path.read_bytes(), first))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _outcome(tmp_path, data: bytes) -> None:
    """Loading ``data`` ends in a model or a CheckpointError, in time."""
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        load_gguf(path, device="cpu")
    except CheckpointError as e:
        assert str(path) in str(e) or "GGUF" in str(e)
    assert time.perf_counter() - start < SECONDS


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_changed_header_bytes(tmp_path, valid, edits):
    data, header_end = valid
    before = _rss()
    mutable = bytearray(data)
    for where, byte in edits:
        mutable[where % header_end] = byte
    _outcome(tmp_path, bytes(mutable))
    assert _rss() - before < MEMORY


@FUZZ
@given(where=st.integers(0, 10**6), value=HOSTILE, width=st.sampled_from([4, 8]))
def test_hostile_numbers_in_header_fields(tmp_path, valid, where, value, width):
    data, header_end = valid
    before = _rss()
    at = where % (header_end - width)
    mutable = bytearray(data)
    mutable[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    _outcome(tmp_path, bytes(mutable))
    assert _rss() - before < MEMORY


@FUZZ
@given(cut=st.integers(0, 10**7))
def test_cut_short_anywhere(tmp_path, valid, cut):
    data, _ = valid
    _outcome(tmp_path, data[: cut % len(data)])


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


values = st.one_of(  # a type and raw bytes for its value (9, an array: its own header)
    st.tuples(st.integers(0, 13).filter(lambda k: k != 9), st.binary(max_size=16)),
    st.tuples(st.just(9), st.tuples(st.integers(0, 13), HOSTILE, st.binary(max_size=32))),
)


@st.composite
def headers(draw) -> bytes:
    """A GGUF header from scratch: plausible structure, hostile numbers."""
    version = draw(st.sampled_from([2, 3]) | st.integers(0, 2**32 - 1))
    keys = draw(st.lists(st.tuples(st.text(max_size=12), values), max_size=6))
    tensors = draw(
        st.lists(
            st.tuples(
                st.text(max_size=12),
                st.lists(HOSTILE, min_size=0, max_size=5),
                st.integers(0, 45),
                HOSTILE,
            ),  # fmt: skip
            max_size=4,
        )
    )
    n_tensors = draw(st.just(len(tensors)) | HOSTILE)
    n_keys = draw(st.just(len(keys)) | HOSTILE)
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys)
    for key, (kind, payload) in keys:
        out += _string(key.encode()) + struct.pack("<I", kind)
        if kind == 9:
            item, count, raw = payload
            out += struct.pack("<IQ", item, count) + raw
        else:
            out += payload
    for name, dims, kind, offset in tensors:
        out += _string(name.encode()) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)
    return out + bytes(draw(st.integers(0, 256)))


@FUZZ
@given(data=headers())
def test_headers_built_from_scratch(tmp_path, data):
    before = _rss()
    path = tmp_path / "built.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        read_header(path)
    except CheckpointError:
        pass
    assert time.perf_counter() - start < SECONDS
    assert _rss() - before < MEMORY
