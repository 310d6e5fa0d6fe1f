"""resid harvest: statistics and top-k against a brute force written plainly here, one
process against two (gloo), SIGKILL + --resume against a clean run, and bad input."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from processes import free_port

import resid
import resid.harvest as H
from resid.cli import main
from resid.core import files
from resid.harvest import Settings, store
from resid.harvest.corpus import PIECE_CHARS, CorpusError, contexts, open_corpus
from resid.viz.dashboard import write_dashboard

SITES = ["blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"]
SETTINGS = dict(context_length=24, batch_size=3, shard_batches=2, k=5, window=(3, 2))
MAX_TOKENS = 1500


def stdlib_documents() -> list[str]:
    """Docstrings every Python install has, one document a line."""
    import collections
    import json as json_module
    import textwrap

    docs = []
    for module in (collections, json_module, textwrap, os.path, random):
        for obj in vars(module).values():
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                docs.append(" ".join(doc.split()))
    return list(dict.fromkeys(docs))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(stdlib_documents()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def clean(tiny, corpus, tmp_path_factory) -> Path:
    """One uninterrupted single-process run, one thread (the reference for the others)."""
    out = tmp_path_factory.mktemp("clean") / "h"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        H.harvest(tiny, corpus, out, SITES, activations=True, max_tokens=MAX_TOKENS,
                  progress=False, **SETTINGS)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


# ---- the brute force -------------------------------------------------------------------


def plain_contexts(tokenizer, docs: list[str], length: int, max_tokens: int) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    stream = []
    for doc in docs:
        ids = tokenizer.encode(doc)
        if ids:
            stream += ids + [bos]
    rows, seen = [], 0
    for start in range(0, len(stream) - (length - 1) + 1, length - 1):
        rows.append([bos] + stream[start : start + length - 1])
        seen += length
        if seen >= max_tokens:
            break
    return rows


def plain_bin(x: float) -> int:
    mags = [2.0**e * (1 + j / 4) for e in range(-12, 12) for j in range(4)] + [2.0**12]
    p = sum(1 for m in mags if m <= abs(x))
    return 97 - p if x < 0 else 97 + p


def brute_force(model, corpus: Path, site: str, k: int, window: tuple[int, int]):
    docs = [line for line in corpus.read_text().splitlines() if line.strip()]
    rows = plain_contexts(model.tokenizer, docs, SETTINGS["context_length"], MAX_TOKENS)
    acts = []
    with torch.no_grad():
        for i in range(0, len(rows), SETTINGS["batch_size"]):  # the harvest's batches
            _, cache = model.run_with_cache(torch.tensor(rows[i : i + SETTINGS["batch_size"]]),
                                            names_filter=[site])  # fmt: skip
            acts.append(cache[site])
    acts = torch.cat(acts)  # [contexts, pos, units]
    tokens = torch.tensor(rows)
    n_ctx, length, units = acts.shape
    flat = acts.reshape(-1, units)
    x = flat.double()
    out = {
        "count": flat.shape[0],
        "mean": x.mean(0),
        "var": x.var(0, correction=0),
        "max": flat.max(0).values,
        "min": flat.min(0).values,
        "active": (flat > 0).sum(0),
    }
    hist = torch.zeros(units, 195, dtype=torch.int64)
    for u in range(0, units, 37):  # a sample of units, value by value
        for v in flat[:, u].tolist():
            hist[u, plain_bin(v)] += 1
    out["hist_sample"] = hist
    top = []
    columns, token_list = acts.permute(2, 0, 1).tolist(), tokens.tolist()  # [units][ctx][pos]
    for u in range(units):
        col = [v for row in columns[u] for v in row]
        ranked = sorted(range(len(col)), key=lambda i: (-col[i], i))[:k]
        entries = []
        for i in ranked:
            c, p = divmod(i, length)
            win = [(token_list[c][q], columns[u][c][q]) if 0 <= q < length else None
                   for q in range(p - window[0], p + window[1] + 1)]  # fmt: skip
            entries.append((col[i], i, win))
        top.append(entries)
    out["top"] = top
    out["acts"], out["tokens"] = flat, tokens.reshape(-1)
    return out


@pytest.mark.parametrize("site", SITES)
def test_statistics_equal_brute_force(tiny, corpus, clean, site):
    s = H.load_stats(clean, site)
    ref = brute_force(tiny, corpus, site, SETTINGS["k"], SETTINGS["window"])
    assert int(s["count"]) == ref["count"]
    torch.testing.assert_close(s["mean"], ref["mean"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s["var"], ref["var"], rtol=1e-6, atol=1e-9)
    assert torch.equal(s["max"], ref["max"]) and torch.equal(s["min"], ref["min"])
    assert torch.equal(s["active"], ref["active"])
    sampled = ref["hist_sample"].sum(1) > 0
    assert torch.equal(s["hist"][sampled], ref["hist_sample"][sampled])
    assert torch.equal(s["hist"].sum(1), torch.full_like(s["hist"][:, 0], ref["count"]))
    for u, entries in enumerate(ref["top"]):
        assert s["top_index"][u].tolist() == [i for _, i, _ in entries]
        assert s["top_values"][u].tolist() == [v for v, _, _ in entries]
        for j, (_, _, win) in enumerate(entries):
            got_t, got_a = s["top_tokens"][u, j].tolist(), s["top_acts"][u, j].tolist()
            assert got_t == [w[0] if w else -1 for w in win]
            assert all(
                (w is None and a != a) or (w and a == w[1]) for w, a in zip(win, got_a, strict=True)
            )
    # the shards hold every real token's activations, in corpus order, bit-identical
    rows = torch.cat([shard[site] for shard in H.iter_shards(clean)])
    assert torch.equal(rows, ref["acts"])
    index = torch.cat([shard["index"] for shard in H.iter_shards(clean)])
    assert torch.equal(index, torch.arange(ref["count"]))


def test_rows_mode_leaves_padding_out(tiny, tmp_path):
    docs = ["short one", "a somewhat longer document with more words in it than the first",
            "mid length text here"]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = H.harvest(tiny, path, tmp_path / "h", ["blocks.0.hook_resid_post"], mode="rows",
                    context_length=12, batch_size=3, text_field="body", activations=True,
                    progress=False)  # fmt: skip
    lengths = [min(len(tiny.tokenizer.encode(d)) + 1, 12) for d in docs]
    s = H.load_stats(out, "blocks.0.hook_resid_post")
    assert int(s["count"]) == sum(lengths)
    (shard,) = H.iter_shards(out)
    want = [c * 12 + p for c, n in enumerate(lengths) for p in range(n)]
    assert shard["index"].tolist() == want
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tiny.to_tokens(docs[0]),
                                       names_filter=["blocks.0.hook_resid_post"])  # fmt: skip
    torch.testing.assert_close(shard["blocks.0.hook_resid_post"][: lengths[0]],
                               cache["blocks.0.hook_resid_post"][0], rtol=1e-5, atol=1e-5)  # fmt: skip


# ---- two processes -------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, model_dir: str, corpus: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    H.init_distributed("cpu", timeout_s=60)
    try:
        model = resid.load(model_dir, device="cpu")
        H.harvest(model, corpus, out, SITES, activations=True, max_tokens=MAX_TOKENS,
                  progress=False, **SETTINGS)  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_equal_one(tiny_dir, corpus, clean, tmp_path):
    out = tmp_path / "h2"
    mp.spawn(_worker, args=(2, free_port(), str(tiny_dir), str(corpus), str(out)), nprocs=2,
             join=True)  # fmt: skip
    one, two = H.read_harvest(clean), H.read_harvest(out)
    assert two["world_size"] == 2 and two["tokens"] == one["tokens"]
    assert [s["path"] for s in one["shards"]] == [s["path"] for s in two["shards"]]
    for a, b in zip(H.iter_shards(clean), H.iter_shards(out), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # bit-identical
    for site in SITES:
        a, b = H.load_stats(clean, site), H.load_stats(out, site)
        for name in ("count", "max", "min", "active", "hist", "top_index", "top_values",
                     "top_tokens"):  # fmt: skip
            assert torch.equal(a[name], b[name]), name
        assert torch.equal(a["top_acts"].nan_to_num(-9), b["top_acts"].nan_to_num(-9))
        torch.testing.assert_close(a["mean"], b["mean"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(a["var"], b["var"], rtol=1e-6, atol=1e-12)
    assert not (out / "ranks").exists()


# ---- kill and resume ----------------------------------------------------------------------


def _kill_after(args: list[str], commits: int, delay: float) -> None:
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    seen = 0
    try:
        for line in proc.stderr:
            if "committed chunk" in line:
                seen += 1
                if seen == commits:
                    time.sleep(delay)
                    break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


def test_sigkill_then_resume_equals_clean_run(tiny, tiny_dir, corpus, clean, tmp_path):
    args = [sys.executable, "-m", "resid", "harvest", str(tiny_dir), str(corpus),
            "--sites", ",".join(SITES), "--activations", "--max-tokens", str(MAX_TOKENS),
            "--context-length", "24", "--batch-size", "3", "--shard-batches", "2", "--k", "5",
            "--window", "3,2", "--quiet", "--log", "--device", "cpu"]  # fmt: skip
    rng = random.Random(0)
    for point, commits in enumerate((1, 3)):
        out = tmp_path / f"killed{point}"
        _kill_after([*args, "--out", str(out)], commits, rng.uniform(0, 0.02))
        assert store.read_manifest(out)["harvest"]["status"] == "running"
        with pytest.raises(H.HarvestError, match="--resume"):
            H.harvest(tiny, corpus, out, SITES, activations=True, max_tokens=MAX_TOKENS,
                      progress=False, **SETTINGS)  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            H.harvest(tiny, corpus, out, SITES, activations=True, max_tokens=MAX_TOKENS,
                      progress=False, resume=True, **SETTINGS)  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        assert_same_harvest(clean, out)


def assert_same_harvest(clean: Path, out: Path) -> None:
    """``out`` holds what the uninterrupted run ``clean`` holds: the same shards bit for
    bit, the same statistics, the same files, and nothing left over."""
    ref, got = H.read_harvest(clean), H.read_harvest(out)
    assert got["tokens"] == ref["tokens"] and got["shards"] == ref["shards"]
    listed_ref = json.loads((clean / "resid-manifest.json").read_text())["files"]
    listed_got = json.loads((out / "resid-manifest.json").read_text())["files"]
    assert listed_got.keys() == listed_ref.keys()
    for a, b in zip(H.iter_shards(clean), H.iter_shards(out), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for site in SITES:
        a, b = H.load_stats(clean, site), H.load_stats(out, site)
        for name in a:
            assert torch.equal(a[name].nan_to_num(-9), b[name].nan_to_num(-9)), (site, name)
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(leftovers) == sorted([*listed_ref, "resid-manifest.json"]), leftovers
    assert not (out / "ranks").exists()


# ---- bad input ----------------------------------------------------------------------------


def test_empty_corpus_is_refused(tiny, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n")
    with pytest.raises(H.HarvestError, match="gives no context"):
        H.harvest(tiny, path, tmp_path / "h", SITES, progress=False)
    assert not (tmp_path / "h").exists()


def test_missing_text_field_is_refused(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(CorpusError, match=r"line 2 .* no 'text' field .*'body'.*--text-field"):
        H.harvest(tiny, path, tmp_path / "h", SITES, context_length=2, progress=False)


def test_unknown_site_is_refused(tiny, corpus, tmp_path):
    with pytest.raises(H.HarvestError, match="blocks.1.mlp.hook_post"):
        H.harvest(tiny, corpus, tmp_path / "h", ["blocks.1.mlp.hook_pots"], progress=False)
    with pytest.raises(H.HarvestError, match="not one vector per token"):
        H.harvest(tiny, corpus, tmp_path / "h", ["blocks.0.attn.hook_pattern"], progress=False)
    assert not (tmp_path / "h").exists()


def test_someone_elses_folder_is_refused_and_left_alone(tiny, corpus, clean, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(H.HarvestError, match="notes.txt"):
        H.harvest(tiny, corpus, out, SITES, progress=False)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    (copy / "shards" / "extra.bin").write_bytes(b"x")
    with pytest.raises(H.HarvestError, match="extra.bin"):
        H.harvest(tiny, corpus, copy, SITES, resume=True, progress=False)
    (copy / "shards" / "extra.bin").unlink()
    with pytest.raises(H.HarvestError, match="finished harvest"):
        H.harvest(tiny, corpus, copy, SITES, progress=False)


def test_world_size_change_on_resume_is_refused(tiny, corpus, clean, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    manifest = json.loads((copy / "resid-manifest.json").read_text())
    manifest["harvest"].update(world_size=2, status="running")
    (copy / "resid-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(H.HarvestError, match="started with 2 process.*resumed with 1"):
        H.harvest(tiny, corpus, copy, SITES, activations=True, max_tokens=MAX_TOKENS,
                  resume=True, progress=False, **SETTINGS)  # fmt: skip
    with pytest.raises(H.HarvestError, match="different settings.*batch_size") as e:
        manifest["harvest"].update(world_size=1)
        (copy / "resid-manifest.json").write_text(json.dumps(manifest))
        H.harvest(tiny, corpus, copy, SITES, activations=True, max_tokens=MAX_TOKENS,
                  resume=True, progress=False, **{**SETTINGS, "batch_size": 4})  # fmt: skip
    assert str(e.value).count("batch_size") == 1, "each changed setting is named once"
    assert "was 3, now 4" in str(e.value)


def test_saved_datasets_folder(tiny, corpus, clean, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = [line for line in corpus.read_text().splitlines() if line.strip()]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = H.harvest(tiny, tmp_path / "ds", tmp_path / "h", SITES, max_tokens=MAX_TOKENS,
                        progress=False, **SETTINGS)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    a, b = H.load_stats(clean, SITES[0]), H.load_stats(out, SITES[0])
    assert torch.equal(a["top_index"], b["top_index"]) and torch.equal(a["hist"], b["hist"])
    with pytest.raises(CorpusError, match="no 'body' column"):
        H.harvest(tiny, tmp_path / "ds", tmp_path / "h2", SITES, text_field="body", progress=False)


KILL_ARGS = ["--sites", ",".join(SITES), "--activations", "--max-tokens", str(MAX_TOKENS),
             "--context-length", "24", "--batch-size", "3", "--shard-batches", "2", "--k", "5",
             "--window", "3,2", "--quiet", "--device", "cpu"]  # fmt: skip

# resid harvest in a child process that SIGKILLs itself inside a write: at the N-th call of
# os.fchmod (atomic_write's temporary just made, still empty) or of os.replace (the
# temporary written whole, not yet renamed). N walks the kill through the kinds of write.
KILL_IN_WRITE = """
import os, signal, sys
which, n = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, which), [0]
def die_at_nth(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, which, die_at_nth)
from resid.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_inside_every_kind_of_write_then_resume(tiny_dir, corpus, clean, tmp_path):
    """Kills inside the first manifest's write (before any manifest exists), inside the
    first shard's (written, not renamed) and inside a rank state's (its temporary empty),
    one after another on the same folder, each followed by --resume: the result is the
    uninterrupted run's, and no temporary is left."""
    out = tmp_path / "h"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["harvest", str(tiny_dir), str(corpus), "--out", str(out), *KILL_ARGS, "--resume"]
    for which, n in (("fchmod", 1), ("replace", 2), ("fchmod", 3)):
        done = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, which, str(n), *argv],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert any(files.is_temp(p.name) for p in out.rglob("*")), "killed inside a write"
    done = subprocess.run([sys.executable, "-m", "resid", *argv], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_harvest(clean, out)


def test_sigkill_at_random_moments_then_resume(tiny_dir, corpus, clean, tmp_path):
    """SIGKILL at random instants of `resid harvest` (start-up, forwards, writes), three
    times on one folder, then --resume: the uninterrupted run's result."""
    out = tmp_path / "h"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "resid", "harvest", str(tiny_dir), str(corpus), "--out",
            str(out), *KILL_ARGS, "--resume"]  # fmt: skip
    rng = random.Random(20)
    for _ in range(3):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            proc.wait(timeout=rng.uniform(1.0, 5.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_same_harvest(clean, out)


# ---- settings bounded and checked before anything is written (issue 20, cause 3) ----------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--k", "1000000000"], "--k"),
        (["--window", "100000,100000"], "--window"),
        (["--window", "abc"], "--window"),
        (["--window", "3"], "--window"),
        (["--active-threshold", "nan"], "--active-threshold"),
        (["--active-threshold", "inf"], "--active-threshold"),
        (["--k", "60000", "--window", "4000,4000"], "GiB of statistics"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-tokens", "-5"], "--max-tokens"),
        (["--context-length", "1000000"], "--context-length"),
    ],
)
def test_unbounded_settings_are_refused_before_anything_is_written(
    tiny_dir, corpus, tmp_path, capsys, flags, named
):
    out = tmp_path / "h"
    start = time.monotonic()
    code = main(["harvest", str(tiny_dir), str(corpus), "--out", str(out), "--sites", SITES[0],
                 "--quiet", "--device", "cpu", *flags])  # fmt: skip
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "nothing may be written before the settings are checked"
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_settings_are_frozen_and_read_back_as_written():
    s = Settings(sites=("a",), k=7, window="3,2", active_threshold=1)
    assert s.window == (3, 2) and s.active_threshold == 1.0
    with pytest.raises(AttributeError):
        s.k = 8  # type: ignore[misc]
    assert Settings.from_record(json.loads(json.dumps(s.record()))) == s


# ---- a harvest's files read back with checks (causes 1, 4 and 9) ---------------------------


def tampered(clean: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    manifest = json.loads((copy / "resid-manifest.json").read_text())
    edit(manifest)
    (copy / "resid-manifest.json").write_text(json.dumps(manifest))
    return copy


TAMPER = {
    "window-null": lambda m: m["harvest"].update(window=[None, 4]),
    "window-huge": lambda m: m["harvest"].update(window=[10**9, 4]),
    "k-edited": lambda m: m["harvest"].update(k=7),
    "k-string": lambda m: m["harvest"].update(k="5"),
    "status-running": lambda m: m["harvest"].update(status="running"),
    "status-bogus": lambda m: m["harvest"].update(status=["complete"]),
    "tokens-negative": lambda m: m["harvest"].update(tokens=-1),
    "shards-dict": lambda m: m["harvest"].update(shards={}),
    "shard-outside": lambda m: m["harvest"]["shards"][0].update(path="../../x.safetensors"),
    "stats-elsewhere": lambda m: m["harvest"]["site_info"][SITES[0]].update(
        stats=f"stats/{SITES[1]}.safetensors"
    ),
    "units-huge": lambda m: m["harvest"]["site_info"][SITES[0]].update(units=10**12),
    "sites-int": lambda m: m["harvest"].update(sites=5),
    "threshold-string": lambda m: m["harvest"].update(active_threshold="nan"),
    "files-outside": lambda m: m["files"].update({"../victim": "0" * 64}),
    "stats-outside": lambda m: (  # a real stats file, outside, listed with its real hash
        m["harvest"]["site_info"][SITES[0]].update(stats="../outside.safetensors"),
        m["files"].update({"../outside.safetensors": m["files"][f"stats/{SITES[0]}.safetensors"]}),
    ),
    "stats-absolute": lambda m: m["harvest"]["site_info"][SITES[0]].update(stats="/etc/passwd"),
}


@pytest.mark.parametrize("name", list(TAMPER))
def test_tampered_manifests_are_harvest_errors(tiny, corpus, clean, tmp_path, name):
    copy = tampered(clean, tmp_path, TAMPER[name])
    shutil.copy(clean / "stats" / f"{SITES[0]}.safetensors", tmp_path / "outside.safetensors")
    with pytest.raises(H.HarvestError):
        H.load_stats(copy, SITES[0])
    with pytest.raises(H.HarvestError):
        write_dashboard(copy, tmp_path / "d", progress=False)
    try:  # resuming: resid's own error, or a finished harvest equal to the clean one
        H.harvest(tiny, corpus, copy, SITES, activations=True, max_tokens=MAX_TOKENS,
                  resume=True, progress=False, **SETTINGS)  # fmt: skip
    except H.HarvestError:
        return
    assert_same_harvest(clean, copy)


def test_a_stats_file_that_is_a_symlink_or_device_is_refused_at_once(clean, tmp_path):
    copy = tampered(clean, tmp_path, lambda m: None)
    path = copy / "stats" / f"{SITES[0]}.safetensors"
    path.unlink()
    path.symlink_to("/dev/zero")
    (copy / "shards" / "000000.safetensors").unlink()
    (copy / "shards" / "000000.safetensors").symlink_to(clean / "shards" / "000000.safetensors")
    start = time.monotonic()
    with pytest.raises(H.HarvestError, match="regular file|symlink"):
        H.load_stats(copy, SITES[0])
    with pytest.raises(H.HarvestError):
        write_dashboard(copy, tmp_path / "d", progress=False)
    with pytest.raises(H.HarvestError, match="regular file|symlink"):
        list(H.iter_shards(copy))
    with pytest.raises(H.HarvestError, match="regular file|symlink"):
        list(H.ActivationStore(copy, SITES[0], shuffle=False))
    assert time.monotonic() - start < 5


# ---- corpora read in bounded pieces (causes 4 and 9) -----------------------------------------


def test_a_long_line_is_tokenized_in_pieces_as_a_whole(tiny, tmp_path):
    """A line far longer than a piece gives exactly the contexts of the whole line
    tokenized at once (pieces are cut where GPT-2's pre-tokenizer cuts anyway)."""
    text = "  ".join(stdlib_documents() * 9) + " tail"
    assert len(text) > 3 * PIECE_CHARS
    path = tmp_path / "long.txt"
    path.write_text(text + "\r\nsecond document\n", encoding="utf-8")
    bos = tiny.tokenizer.bos_token_id
    got = [ids for ids, _ in contexts(open_corpus(path), tiny.tokenizer, 64)]
    stream = tiny.tokenizer.encode(text) + [bos] + tiny.tokenizer.encode("second document") + [bos]
    want = [[bos, *stream[i : i + 63]] for i in range(0, len(stream) - 62, 63)]
    assert got == want


MEMORY_PROBE = """
import resource, sys
import resid
from resid.harvest.corpus import contexts, open_corpus
tokenizer = resid.load(sys.argv[1], device="cpu").tokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = 0
for ids, _ in contexts(open_corpus(sys.argv[2]), tokenizer, 128):
    n += len(ids)
    if n >= 2000:
        break
print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_20_mb_file_without_a_newline_reads_in_bounded_memory(tiny_dir, tmp_path):
    """The first 2,000 tokens of a 20 MB one-line file: a few pieces are read and tokenized,
    not the whole line (which took about 3 GiB)."""
    path = tmp_path / "one-line.txt"
    words = "the cat sat on the mat and looked at the dog; " * 1000
    with open(path, "w") as f:
        for _ in range(20_000_000 // len(words)):
            f.write(words)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tiny_dir), str(path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    tokens, grew_mib = map(int, done.stdout.split())
    assert tokens >= 2000
    assert grew_mib < 200, f"reading grew the process by {grew_mib} MiB"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}", "nests JSON"),
        ('{"text": "fine", "x": ' + "{" * 5000 + "}" * 5000 + "}", "nests JSON|not JSON"),
        ('{"text": "a\\ud800b"}', "lone surrogate"),
        ('{"text": "\\udfff"}', "lone surrogate"),
        ("[1, 2]", "not an object"),
        ('{"text": 5}', "not a string"),
    ],
)
def test_hostile_jsonl_records_are_corpus_errors(tiny, tmp_path, line, match):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "a fine first record"}) + "\n" + line + "\n")
    with pytest.raises(CorpusError, match=f"line 2 .*({match})"):
        list(contexts(open_corpus(path), tiny.tokenizer, 4))


def test_a_device_or_fifo_corpus_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    start = time.monotonic()
    for path in ("/dev/zero", tmp_path / "fifo.txt"):
        with pytest.raises(CorpusError, match="not a regular file"):
            open_corpus(path)
    assert time.monotonic() - start < 2


def test_an_unknown_corpus_suffix_is_named(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"not '\.csv'") as e:
        open_corpus(path)
    assert "{" not in str(e.value)


# ---- the model recorded so it can be found again; files the user's group can read (issue 24)


def test_the_model_is_recorded_absolute_and_the_dashboard_runs_from_elsewhere(
    tiny_dir, corpus, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tiny_dir.parent)
    out = tmp_path / "h"
    old = os.umask(0o022)
    try:
        assert main(["harvest", tiny_dir.name, str(corpus), "--out", str(out), "--sites",
                     SITES[0], "--max-tokens", "200", "--context-length", "24", "--quiet",
                     "--device", "cpu", "--activations"]) == 0  # fmt: skip
    finally:
        os.umask(old)
    assert H.read_harvest(out)["model"] == str(tiny_dir.resolve())
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777
             for p in out.rglob("*") if p.is_file()}  # fmt: skip
    assert modes and set(modes.values()) == {0o644}, modes  # not mkstemp's 0o600
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", str(out), "--out", str(tmp_path / "d"), "--units", "0",
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    moved = tampered(out, tmp_path, lambda m: m["harvest"].update(model=str(tmp_path / "gone")))
    assert main(["dashboard", str(moved), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "--no-model" in err, err


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("resid.io.harvest", "resid.harvest",
         ["harvest", "load_stats", "read_harvest", "iter_shards", "HarvestError", "UnitStats",
          "init_distributed", "default_edges"]),
        ("resid.io.corpus", "resid.harvest.corpus",
         ["Corpus", "CorpusError", "contexts", "open_corpus"]),
        ("resid.io.activation_store", "resid.harvest", ["ActivationStore"]),
    ],
)  # fmt: skip
def test_the_old_import_paths_still_work_and_name_the_new_place(old, new, names):
    sys.modules.pop(old, None)  # import it afresh, so its warning is seen here
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    for name in names:
        assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_resume_compares_the_model_config_field_by_field(tiny, corpus, clean, tmp_path):
    """A field an older resid did not record is no change; a changed field is named."""
    run = dict(activations=True, max_tokens=MAX_TOKENS, resume=True, progress=False, **SETTINGS)
    field = next(iter(json.loads((clean / "resid-manifest.json").read_text())["harvest"]
                      ["model_config"]))  # fmt: skip
    older = tampered(clean, tmp_path / "a", lambda m: m["harvest"]["model_config"].pop(field))
    assert H.harvest(tiny, corpus, older, SITES, **run) == older  # already complete
    edited = tampered(clean, tmp_path / "b", lambda m: m["harvest"]["model_config"].update(
        d_model=tiny.cfg.d_model + 1))  # fmt: skip
    with pytest.raises(H.HarvestError, match=r"model_config\.d_model: was \d+, now \d+\)") as e:
        H.harvest(tiny, corpus, edited, SITES, **run)
    assert str(e.value).count("d_model") == 1
