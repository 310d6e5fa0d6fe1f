"""Issue 11: nothing lost, nothing hangs. Fresh machines (no browser), hostile checkpoint
files, outputs that must not be deleted, and runs interrupted by signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from folders import hidden_leftovers, snapshot
from processes import kill_trials_report

import resid
from resid.core import files
from resid.core.tokenizer import Tokenizer
from resid.viz.attention_pages import write_attention
from resid.viz.plots import parse_indices

PROMPT = "The cat sat on the mat. The cat"
TOKENS = torch.tensor([[50256, 464, 3797, 3332, 319, 262, 2603, 13]])


def run_cli(*argv, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resid", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)  # fmt: skip


# ---- 1. static image export: a browser is looked for first, and every call is bounded --------


def test_png_export_with_no_browser_skips_in_seconds(tiny_dir, tmp_path):
    """A fresh machine: no Chrome anywhere kaleido looks (BROWSER_PATH is what its finder
    reads first, so a missing path hides every installed browser). The run must finish, fast,
    with one line saying PNG was skipped and why, and the HTML written."""
    env = dict(os.environ, BROWSER_PATH=str(tmp_path / "no-chrome-here"),
               PATH=str(Path(sys.executable).parent))  # fmt: skip
    out = tmp_path / "attn"
    start = time.monotonic()
    done = run_cli("attention", tiny_dir, PROMPT, "--out", out, "--format", "html,png",
                   "--heads", "0", "--quiet", "--device", "cpu", env=env, timeout=60)  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"
    notes = [ln for ln in done.stderr.splitlines() if "PNG export skipped" in ln]
    assert len(notes) == 1 and "does not exist" in notes[0], done.stderr
    assert list(out.glob("*.png")) == [] and (out / "L0H0.html").is_file()


def test_a_hanging_browser_is_stopped(tiny, tmp_path, monkeypatch):
    """A browser that starts and never answers: the export is bounded by a timeout, the
    browser killed, and one line says so."""
    pid_file = tmp_path / "browser.pid"
    fake = tmp_path / "chrome"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    monkeypatch.setenv("RESID_EXPORT_TIMEOUT", "3")
    start = time.monotonic()
    _, _, notes = write_attention(tiny, PROMPT, tmp_path / "attn", layers="0", heads="0",
                                  formats=["html", "png"], progress=False)  # fmt: skip
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert len(notes) == 1 and "PNG export skipped" in notes[0], notes
    assert list((tmp_path / "attn").glob("*.png")) == []
    if pid_file.exists():  # kaleido started it: it must not outlive the export
        pid = int(pid_file.read_text())
        for _ in range(50):
            try:  # gone, or a zombie waiting to be reaped
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the hung browser was left running")


# ---- 3. resid.save replaces a checkpoint whole -------------------------------------------------


def test_save_leaves_no_stale_weights_or_tokenizer(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    resid.save(tiny, folder)
    assert (folder / "tokenizer.json").is_file()
    toy = resid.load(Path(__file__).parents[1] / "notebooks" / "toy-induction", device="cpu")
    resid.save(toy, folder)  # a model with no tokenizer of its own, over one with
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "resid-manifest.json"]  # fmt: skip
    again = resid.load(folder, device="cpu")
    tokens = torch.tensor([[127, 3, 5, 3, 5]])
    torch.testing.assert_close(again(tokens), toy(tokens), atol=0, rtol=0)


def test_save_refuses_a_folder_it_did_not_write(tiny, tiny_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"old weights")
    (folder / "tokenizer.json").write_text("{}")
    before = snapshot(folder)
    with pytest.raises(
        files.ForeignFilesError, match="pytorch_model.bin.*tokenizer.json|tokenizer"
    ):
        resid.save(tiny, folder)
    assert snapshot(folder) == before
    assert hidden_leftovers(tmp_path) == []


def test_save_writes_no_gpt2_ids_into_other_vocabularies(tiny, tmp_path):
    toy_dir = Path(__file__).parents[1] / "notebooks" / "toy-induction"
    committed = json.loads((toy_dir / "config.json").read_text())
    assert committed["vocab_size"] == 128 and "bos_token_id" not in committed
    assert files.foreign_files(toy_dir, "resid.save") == []  # its manifest matches its files
    toy = resid.load(toy_dir, device="cpu")
    resid.save(toy, tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert "bos_token_id" not in config and "eos_token_id" not in config
    resid.save(tiny, tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == Tokenizer.gpt2().bos_token_id


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)  # fork-safe: no OpenMP pool in the children
    import resid

    source, folder, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    a = resid.load(source, device="cpu")
    b = resid.load(source, device="cpu")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)
    tokens = torch.tensor([[50256, 464, 3797, 3332, 319, 262, 2603, 13]])
    with torch.no_grad():
        expected = {"a": a(tokens), "b": b(tokens)}

    def which():
        try:
            m = resid.load(folder, device="cpu")
        except Exception as e:
            return "broken: " + type(e).__name__ + ": " + str(e)[:200]
        with torch.no_grad():
            got = m(tokens)
        for name, want in expected.items():
            if torch.equal(got, want):
                return name
        return "neither"

    resid.save(a, folder)

    def forked_save(model):
        pid = os.fork()
        if pid == 0:
            try:
                resid.save(model, folder)
            finally:
                os._exit(0)
        return pid

    start = time.monotonic()  # how long a save takes in a forked child, start to exit
    os.waitpid(forked_save(b), 0)
    seconds = time.monotonic() - start
    models = {"a": a, "b": b}
    results = kill_trials(lambda name: resid.save(models[name], folder), which, seconds, trials)
    print(json.dumps({"save_seconds": seconds, "results": results}))
    """
)


def test_save_killed_at_random_moments_leaves_old_or_new(tiny_dir, tmp_path):
    report = kill_trials_report(KILL_SCRIPT, tiny_dir, tmp_path / "ckpt", 20)
    results = report["results"]
    assert len(results) == 20
    bad = [r for r in results if r["found"] not in (r["old"], r["new"])]
    assert bad == [], bad
    print(f"save took {report['save_seconds']:.3f} s; kept old {sum(r['found'] == r['old'] for r in results)},"
          f" got new {sum(r['found'] == r['new'] for r in results)}")  # fmt: skip


# ---- 4-6. checkpoints validated: moved to tests/test_loading.py ------------------------------


def test_a_range_of_ten_billion_heads_is_refused_at_once():
    start = time.monotonic()
    with pytest.raises(
        ValueError, match="head 10000000000 is out of range: this model has heads 0-11"
    ):
        parse_indices("0-10000000000", 12, "head")
    assert time.monotonic() - start < 1


# ---- 8-10 -----------------------------------------------------------------------------------


def test_half_precision_tolerance_follows_the_formats_epsilon():
    from resid.io.compare import tolerance

    bf16_eps, f16_eps = 2.0**-7, 2.0**-10  # IEEE-style formats: 8 and 11 significand bits
    _, bf16 = tolerance(torch.bfloat16, 12)
    _, f16 = tolerance(torch.float16, 12)
    assert f16 / bf16 == pytest.approx(f16_eps / bf16_eps)
    assert 1 <= bf16 / bf16_eps <= 8, "a handful of ulps at the logit scale"
    _, shallow = tolerance(torch.bfloat16, 2)
    assert shallow < bf16, "deeper models accumulate more rounding"
