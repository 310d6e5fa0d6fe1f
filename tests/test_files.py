"""resid.core.files: owned, atomic writes. Paths read from a manifest stay inside their
folder (a crafted manifest cannot make resid delete or read a file elsewhere), readers
never follow a symlink or read a device, single files are written whole through
temporaries resid can recognise, and every file gets the user's umask permissions.
The ``resid attention --out`` tests drive the same code through the command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from folders import hidden_leftovers, snapshot

import resid
from resid.cli import main
from resid.core import files
from resid.viz.attention_pages import write_attention

PROMPT = "The cat sat on the mat. The cat"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- manifest paths stay inside their folder (issue 20, cause 1) ----------------------------


def crafted(folder: Path, writer: str, listed: dict[str, str]) -> None:
    """A folder holding only a manifest of ``writer`` that lists ``listed``."""
    folder.mkdir(parents=True)
    body = {"writer": writer, "files": listed}
    (folder / files.MANIFEST).write_text(json.dumps(body))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "nested-dotdot"])
def test_a_manifest_cannot_make_replace_folder_delete_outside(tmp_path, how):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "deep" / "out"
    rel = {"dotdot": "../../victim.txt", "absolute": str(victim),
           "nested-dotdot": "a/../../../victim.txt"}[how]  # fmt: skip
    crafted(out, "resid save", {rel: digest(b"precious")})
    try:
        with files.replace_folder(out, "resid save") as tmp:
            (tmp / "new.txt").write_text("new")
    except files.ForeignFilesError:
        pass  # refusing the folder is as good as replacing it
    assert victim.read_bytes() == b"precious"


def test_resid_attention_out_never_deletes_a_file_a_manifest_points_at(tiny_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "attn"
    crafted(out, "resid attention", {"../victim.txt": digest(b"precious")})
    main(["attention", str(tiny_dir), PROMPT, "--out", str(out), "--quiet", "--device", "cpu",
          "--layers", "0", "--heads", "0"])  # fmt: skip
    assert victim.read_bytes() == b"precious"


def test_resid_save_never_deletes_a_file_a_manifest_points_at(tiny, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "ckpt"
    crafted(out, "resid.save", {str(victim): digest(b"precious")})
    try:
        resid.save(tiny, out)
    except files.ForeignFilesError:
        pass
    assert victim.read_bytes() == b"precious"


def test_a_symlinked_folder_in_the_manifest_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f.txt").write_bytes(b"theirs")
    out = tmp_path / "out"
    crafted(out, "resid save", {"sub/f.txt": digest(b"theirs")})
    (out / "sub").symlink_to(elsewhere)
    with pytest.raises(files.ForeignFilesError, match="sub"):
        files.check_replaceable(out, "resid save")
    files.remove_owned(out, "resid save")  # even asked directly, it deletes nothing there
    assert (elsewhere / "f.txt").read_bytes() == b"theirs"
    with pytest.raises(files.UnsafePathError, match="symlink"):
        files.inside(out, "sub/f.txt")


@pytest.mark.parametrize(
    "rel", ["", ".", "..", "../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "C:/x", "a\0b", 7]
)
def test_unsafe_manifest_paths_are_refused(tmp_path, rel):
    with pytest.raises(files.UnsafePathError):
        files.inside(tmp_path, rel)
    folder = tmp_path / "f"
    crafted(folder, "w", {rel if isinstance(rel, str) else "x": "0" * 64})
    if not isinstance(rel, str):
        body = json.loads((folder / files.MANIFEST).read_text())
        (folder / files.MANIFEST).write_text(json.dumps({**body, "files": {"x": 7}}))
    assert files.read_manifest(folder) is None


def test_safe_paths_pass(tmp_path):
    assert files.inside(tmp_path, "stats/blocks.0.mlp.hook_post.safetensors") == (
        tmp_path / "stats" / "blocks.0.mlp.hook_post.safetensors"
    )


# ---- bounded reads (cause 4) --------------------------------------------------------------


def test_readers_refuse_devices_fifos_and_symlinks_at_once(tmp_path):
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would wait for a writer forever
    start = time.monotonic()
    for name in ("zero", "fifo"):
        with pytest.raises(files.UnsafePathError):
            files.sha256(tmp_path / name)
        with pytest.raises(files.UnsafePathError):
            files.read_regular(tmp_path / name, 1 << 20)
    with pytest.raises(files.UnsafePathError):
        files.read_regular("/dev/zero", 1 << 20)
    assert time.monotonic() - start < 2
    (tmp_path / "big").write_bytes(b"x" * 2000)
    with pytest.raises(files.UnsafePathError, match="2,000 bytes"):
        files.read_regular(tmp_path / "big", 1000)
    assert files.read_regular(tmp_path / "big", 2000) == b"x" * 2000
    assert files.sha256(tmp_path / "big") == digest(b"x" * 2000)


def test_a_manifest_symlinked_to_dev_zero_is_no_manifest(tmp_path):
    (tmp_path / files.MANIFEST).symlink_to("/dev/zero")
    start = time.monotonic()
    assert files.read_manifest(tmp_path) is None
    assert time.monotonic() - start < 2


# ---- single files written whole, with the umask's permissions (issue 24 item 7) -----------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_umask_is_read_without_changing_it(umask_027):
    assert files.umask() == 0o027 and files.umask() == 0o027
    assert files.file_mode() == 0o640 and files.dir_mode() == 0o750


def test_atomic_write_gives_umask_permissions_and_leaves_no_temporary(tmp_path, umask_027):
    path = tmp_path / "x.bin"
    assert files.atomic_write(path, b"abc") == digest(b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # mkstemp alone gives 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    files.atomic_write(path, b"def")
    assert path.read_bytes() == b"def"


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        files.atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_temporaries_are_recognised_by_name():
    assert files.is_temp(".000003.safetensors.resid-tmp-a1b2c3d4") == "000003.safetensors"
    assert files.is_temp("000003.safetensors") is None
    assert files.is_temp(".000003.safetensors.tmp1234") is None  # not resid's


def test_replace_folder_gives_every_file_umask_permissions(tmp_path, umask_027):
    out = tmp_path / "out"
    with files.replace_folder(out, "w") as tmp:
        fd = os.open(tmp / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # as mkstemp does
        os.write(fd, b"x")
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "a.txt").write_text("a")
    assert stat.S_IMODE((out / "private.bin").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / files.MANIFEST).stat().st_mode) == 0o640
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_resid_save_files_are_readable_by_the_group(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        resid.save(tiny, tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


# ---- resid attention --out: atomic, owned, interruptible ------------------------------------


def attention_argv(tiny_dir, out, *extra):
    return ["attention", str(tiny_dir), PROMPT, "--out", str(out), "--quiet", "--device", "cpu",
            "--layers", "0", *extra]  # fmt: skip


def test_a_file_added_to_the_output_is_never_deleted(tiny_dir, tmp_path, capsys):
    out = tmp_path / "attn"
    assert main(attention_argv(tiny_dir, out)) == 0
    (out / "my_notes.ipynb").write_text('{"cells": []}')
    before = snapshot(out)
    assert main(attention_argv(tiny_dir, out, "--heads", "1")) == 2
    err = capsys.readouterr().err
    assert "my_notes.ipynb" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []


def test_a_project_folder_with_a_copied_index_is_refused(tiny_dir, tmp_path, capsys):
    earlier = tmp_path / "earlier"
    assert main(attention_argv(tiny_dir, earlier)) == 0
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(earlier / "index.html", project / "index.html")  # carries resid's generator tag
    (project / "paper.tex").write_text(r"\documentclass{article}")
    before = snapshot(project)
    assert main(attention_argv(tiny_dir, project)) == 2
    err = capsys.readouterr().err
    assert "paper.tex" in err and "index.html" in err, err
    assert snapshot(project) == before


def test_a_changed_output_file_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "attn"
    assert main(attention_argv(tiny_dir, out)) == 0
    with open(out / "L0H0.html", "a") as f:
        f.write("<!-- my edit -->")
    before = snapshot(out)
    assert main(attention_argv(tiny_dir, out)) == 2
    assert "L0H0.html (changed since resid wrote it)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_an_earlier_output_is_replaced_whole(tiny_dir, tmp_path):
    out = tmp_path / "attn"
    assert main(attention_argv(tiny_dir, out, "--heads", "0-3")) == 0
    assert main(attention_argv(tiny_dir, out, "--heads", "2")) == 0
    assert sorted(p.name for p in out.glob("L*")) == ["L0H2.html"]
    assert hidden_leftovers(tmp_path) == []


def test_out_dot_is_refused_and_the_directory_stays(tiny_dir, tmp_path, monkeypatch, capsys):
    here = tmp_path / "work"
    here.mkdir()
    (here / "data.txt").write_text("mine")
    monkeypatch.chdir(here)
    assert main(attention_argv(tiny_dir, ".")) == 2
    err = capsys.readouterr().err
    assert "current directory" in err and "No such file" not in err, err
    assert (
        here.is_dir()
        and Path.cwd() == here
        and snapshot(here) == {"data.txt": hashlib.sha256(b"mine").hexdigest()}
    )
    assert hidden_leftovers(tmp_path) == []


def test_a_symlinked_out_is_kept_and_its_target_replaced(tiny_dir, tmp_path):
    real = tmp_path / "real-attn"
    assert main(attention_argv(tiny_dir, real, "--heads", "0")) == 0
    link = tmp_path / "attn"
    link.symlink_to(real)
    assert main(attention_argv(tiny_dir, link, "--heads", "1")) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.glob("L*")) == ["L0H1.html"]
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_keeps_the_previous_output(tiny_dir, tmp_path, sig):
    out = tmp_path / "attn"
    assert main(attention_argv(tiny_dir, out)) == 0
    before = snapshot(out)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i} and some more words\n" for i in range(400)))
    proc = subprocess.Popen([sys.executable, "-m", "resid", "attention", str(tiny_dir),
                             "--prompts-file", str(prompts), "--out", str(out), "--quiet",
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until it is writing
            partial = [p for p in tmp_path.glob(".attn.partial-*") if len(list(p.rglob("*"))) > 20]
            if partial or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Traceback" not in err or sig == signal.SIGINT
    assert hidden_leftovers(tmp_path) == [], "the partial output was left behind"
    assert snapshot(out) == before, "the previous output was not kept"


@pytest.mark.parametrize("exchange", [True, False])
def test_ctrl_c_between_the_renames_never_leaves_nothing(tiny, tmp_path, monkeypatch, exchange):
    out = tmp_path / "attn"
    write_attention(tiny, PROMPT, out, layers="0", heads="0", progress=False)
    real_exchange, real_rename = files._exchange, os.rename

    def exchange_then_ctrl_c(a, b):
        done = real_exchange(a, b) if exchange else False
        if done:
            os.kill(os.getpid(), signal.SIGINT)
        return done

    renames = []

    def rename_then_ctrl_c(a, b):
        real_rename(a, b)
        renames.append((a, b))
        if len(renames) == 1 and Path(a) == out:  # the old output just moved aside
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(files, "_exchange", exchange_then_ctrl_c)
    monkeypatch.setattr(os, "rename", rename_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_attention(tiny, PROMPT, out, layers="0", heads="1", progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("L*")) == ["L0H1.html"], "the new output must be there"
    assert hidden_leftovers(tmp_path) == []


def test_sae_save_files_are_readable_by_the_group(tiny, tmp_path):
    """safetensors writes through mkstemp (0o600); replace_folder gives every file the
    umask's mode, so an SAE saved on a shared filesystem is readable by the group."""
    from resid.sae import SAE, SAEConfig, save

    sae = SAE(SAEConfig(d_in=tiny.cfg.d_model, d_sae=8, hook_name="blocks.0.hook_resid_pre"))
    old = os.umask(0o022)
    try:
        save(sae, tmp_path / "sae")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "sae").iterdir()}
    assert len(modes) >= 3 and all(m == 0o644 for m in modes.values()), modes
