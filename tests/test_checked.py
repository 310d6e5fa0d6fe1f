"""resid.io.checked: a checkpoint found finite once is not read whole again, and a record
never vouches for a file that changed since, nor for another dtype."""

from __future__ import annotations

import json
import math
import os
import struct
import time

import pytest
import torch
from conftest import make_hf_gpt2

import resid
from resid import CheckpointError
from resid.io import checked

SHAPE = dict(n_layer=2, n_head=4, n_embd=128, n_positions=64)  # wte: 25.7 MB, 6,300 pages


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A saved GPT-2, old enough to be recorded (the margin shortened to 0.2 s), with the
    records kept in the test's own folder."""
    monkeypatch.setenv("RESID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checked, "MARGIN_NS", 200_000_000)
    out = tmp_path / "model"
    make_hf_gpt2(seed=0, std=0.02, **SHAPE).save_pretrained(out)
    time.sleep(0.3)
    return out


def records(tmp_path) -> list[str]:
    where = tmp_path / "cache" / "checked"
    return sorted(os.listdir(where)) if where.is_dir() else []


def write_in_place(path, name: str, value: float) -> None:
    """One float32 of tensor ``name`` overwritten inside the safetensors file itself (same
    inode, same size)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        begin, _ = json.loads(f.read(n))[name]["data_offsets"]
        f.seek(8 + n + begin)
        f.write(struct.pack("<f", value))


def file_pages_read(folder) -> int:
    """Bytes of mapped files a load made resident (``RssFile``), the model kept alive."""

    def rss_file() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))

    before = rss_file()
    model = resid.load(folder, device="cpu")
    grown = rss_file() - before
    del model
    return grown


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_a_recorded_checkpoint_is_not_read_again(folder, tmp_path, monkeypatch):
    """A second load of the same files brings almost none of their pages into memory; a
    load without the record reads them all. Both give the same model."""
    first = resid.load(folder, device="cpu")
    assert len(records(tmp_path)) == 1
    size = (folder / "model.safetensors").stat().st_size
    recorded = file_pages_read(folder)
    monkeypatch.setenv("RESID_CACHE", str(tmp_path / "elsewhere"))  # no record there
    unrecorded = file_pages_read(folder)
    assert recorded < 0.1 * size and unrecorded > 0.9 * size, (recorded, unrecorded, size)
    monkeypatch.setenv("RESID_CACHE", str(tmp_path / "cache"))
    again = resid.load(folder, device="cpu")
    for (name, a), (_, b) in zip(first.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_file_changed_in_place_is_checked_again(folder, tmp_path):
    """Same inode, same size, one NaN written into it after it was recorded: refused."""
    resid.load(folder, device="cpu")
    assert len(records(tmp_path)) == 1
    write_in_place(folder / "model.safetensors", "transformer.h.1.mlp.c_proj.weight", math.nan)
    with pytest.raises(CheckpointError, match=r"non-finite weights .* h\.1\.mlp\.c_proj\.weight"):
        resid.load(folder, device="cpu")


def test_a_record_is_for_one_dtype(folder, tmp_path):
    """A weight of 1e5 is finite in float32 and Inf in float16: the float32 record does not
    let a float16 load through."""
    write_in_place(folder / "model.safetensors", "transformer.h.0.attn.c_proj.weight", 1e5)
    time.sleep(0.3)
    resid.load(folder, device="cpu")
    assert len(records(tmp_path)) == 1
    with pytest.raises(CheckpointError, match=r"non-finite .* \(as torch\.float16\)"):
        resid.load(folder, device="cpu", dtype=torch.float16)


def test_fresh_files_and_unwritable_folders_leave_no_record(tmp_path, monkeypatch):
    """A file changed within the margin (2 s) is not recorded; a records folder that cannot
    be made, or a relative one, is no error and holds no record."""
    monkeypatch.setenv("RESID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "model"
    make_hf_gpt2(seed=0, std=0.02, **SHAPE).save_pretrained(out)
    resid.load(out, device="cpu")
    assert records(tmp_path) == []
    (tmp_path / "blocker").write_text("a file where the folder would go")
    monkeypatch.setenv("RESID_CACHE", str(tmp_path / "blocker"))
    monkeypatch.setattr(checked, "MARGIN_NS", 0)
    time.sleep(0.05)
    resid.load(out, device="cpu")  # checks the values, records nothing, raises nothing
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESID_CACHE", "relative")  # not absolute: no records at all
    resid.load(out, device="cpu")
    assert not (tmp_path / "relative").exists()


def test_records_are_pruned_and_only_records(tmp_path, monkeypatch):
    """Past MAX_RECORDS the oldest records go; a file in the folder that is not a record
    stays, however old."""
    monkeypatch.setenv("RESID_CACHE", str(tmp_path))
    monkeypatch.setattr(checked, "MAX_RECORDS", 3)
    where = tmp_path / "checked"
    where.mkdir()
    foreign = where / ("0" * 64)
    foreign.write_text("not a record")
    os.utime(foreign, ns=(1, 1))
    keys = [json.dumps({"version": 1, "dtype": "x", "files": [[i]]}) for i in range(5)]
    for i, key in enumerate(keys):
        checked.remember(key)
        os.utime(checked._path(key), ns=(10 + i, 10 + i))
    assert foreign.exists()
    kept = [k for k in keys if checked.is_known(k)]
    assert kept == keys[-3:]  # the three newest records


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_hostile_records_folder(tmp_path, monkeypatch):
    """A record reached through a symlink, a FIFO or a folder under a record's name is not
    trusted and raises nothing; pruning removes none of them nor what a link points at."""
    monkeypatch.setenv("RESID_CACHE", str(tmp_path))
    monkeypatch.setattr(checked, "MAX_RECORDS", 1)
    where = tmp_path / "checked"
    where.mkdir()
    keys = [json.dumps({"version": 1, "dtype": "x", "files": [[i]]}) for i in range(4)]
    outside = tmp_path / "outside"
    outside.write_text(keys[0])
    os.symlink(outside, checked._path(keys[0]))
    os.mkfifo(checked._path(keys[1]))
    checked._path(keys[2]).mkdir()
    for key in keys[:3]:
        os.utime(checked._path(key), ns=(1, 1), follow_symlinks=False)
        assert not checked.is_known(key)
    checked.remember(keys[3])  # four entries over a limit of one: only records may go
    assert checked.is_known(keys[3])
    assert outside.read_text() == keys[0] and os.path.islink(checked._path(keys[0]))
    assert checked._path(keys[1]).exists() and checked._path(keys[2]).is_dir()
