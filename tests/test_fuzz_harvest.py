"""Property-based fuzzing of what resid's harvest reads from disk: harvest manifests (read
back by load_stats, iter_shards, the activation store, the dashboard and --resume), the
manifest of a dashboard's output folder, and .jsonl corpora.

Every example must end in resid's own error or in success, within a time and memory
bound, and must leave every file resid did not write (the victims beside the harvest,
whose paths and hashes the fuzzer plants in manifests) exactly as it was.

The budget is RESID_FUZZ_EXAMPLES examples a property (default 25): set it higher for a
longer run, e.g. ``RESID_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_harvest.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from folders import snapshot
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import resid.harvest as H
from resid.core import files
from resid.harvest.corpus import CorpusError, contexts, open_corpus
from resid.viz.dashboard import write_dashboard

FUZZ = fuzz_settings(HealthCheck.function_scoped_fixture)
SITES = ["blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"]
RUN = dict(context_length=8, batch_size=2, shard_batches=2, k=3, window=(2, 1), max_tokens=120)
OWN_ERRORS = (H.HarvestError, CorpusError, files.ForeignFilesError)
SECONDS = 20  # per example
PEAK_BYTES = 256 << 20  # Python-side allocations per example


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """A finished harvest, its corpus, and victims: files beside it resid never wrote."""
    root = tmp_path_factory.mktemp("fuzz")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"The {w} sat on the mat and saw a {v}.\n"
                              for w in ("cat", "dog", "owl") for v in ("fox", "hen")))  # fmt: skip
    clean = H.harvest(tiny, corpus, root / "clean", SITES, activations=True, progress=False, **RUN)
    victims = root / "victims"
    victims.mkdir()
    (victims / "victim.txt").write_bytes(b"not resid's")
    shutil.copy(clean / "stats" / f"{SITES[0]}.safetensors", victims / "stats.safetensors")
    return {"root": root, "corpus": corpus, "clean": clean, "victims": victims}


def bounded(call):
    """Run ``call``: resid's own error or success, within the time and memory bound."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        call()
    except OWN_ERRORS:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert peak < PEAK_BYTES, f"allocated {peak / 2**20:.0f} MiB"


def hostile_values(victims: Path):
    """JSON values a manifest could hold, weighted to the ones that have broken readers."""
    planted = st.sampled_from([
        "../victims/victim.txt", "../../victims/victim.txt", str(victims / "victim.txt"),
        "stats/../../victims/stats.safetensors", "/dev/zero", "", ".", "..", "shards/",
        "shards/000000.safetensors", f"stats/{SITES[1]}.safetensors", "complete", "running",
        [None, 4], [10**9, 10**9], [-1, 2], 10**18, -1, 0, 1e308, float("nan"), float("inf"),
        True, None, [], {}, {"path": "../victims/victim.txt", "rows": 1, "chunk": 0},
    ])  # fmt: skip
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
        st.text(max_size=40), planted,
    )  # fmt: skip
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )


def paths_in(value, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, (*prefix, i))


def apply(manifest, path, op, value):
    """Set, delete, or (at the root) replace what ``path`` names."""
    if not path:
        return value if op == "set" else {}
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if op == "delete" and isinstance(parent, dict):
        parent.pop(path[-1], None)
    elif op == "delete":
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return manifest


@st.composite
def mutations(draw, manifest, victims):
    """A list of edits to ``manifest``, and optionally a hostile entry in its file list."""
    edits = []
    paths = list(paths_in(manifest))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["set", "set", "delete"]))
        edits.append((path, op, draw(hostile_values(victims))))
    listed = draw(st.one_of(st.none(), st.sampled_from([
        "../victims/victim.txt", str(victims / "victim.txt"), "a/../../victims/victim.txt",
    ])))  # fmt: skip
    raw = draw(st.one_of(st.none(), st.binary(max_size=64)))
    return edits, listed, raw


def test_the_fuzzer_sees_real_manifests(world):
    manifest = json.loads((world["clean"] / files.MANIFEST).read_text())
    assert len(list(paths_in(manifest))) > 40  # the harvest record is there to be mutated


@FUZZ
@given(data=st.data())
def test_fuzzed_harvest_manifests(tiny, world, tmp_path_factory, data):
    clean, victims = world["clean"], world["victims"]
    manifest = json.loads((clean / files.MANIFEST).read_text())
    edits, listed, raw = data.draw(mutations(manifest, victims))
    for path, op, value in edits:
        try:
            manifest = apply(manifest, path, op, value)
        except (KeyError, IndexError, TypeError, AttributeError):
            pass  # an earlier edit removed what this one names, or replaced it by a scalar
    if (
        listed is not None
        and isinstance(manifest, dict)
        and isinstance(manifest.get("files"), dict)
    ):
        manifest["files"][listed] = hashlib.sha256(b"not resid's").hexdigest()
    work = tmp_path_factory.mktemp("case")
    copy = work / "h"
    shutil.copytree(clean, copy)
    body = raw if raw is not None else json.dumps(manifest).encode()
    (copy / files.MANIFEST).write_bytes(body)
    before = snapshot(victims)

    bounded(lambda: H.read_harvest(copy))
    for site in SITES:
        bounded(lambda site=site: H.load_stats(copy, site))
    bounded(lambda: list(H.iter_shards(copy)))
    bounded(lambda: list(H.ActivationStore(copy, SITES[0], batch_size=7)))
    bounded(lambda: write_dashboard(copy, work / "d", progress=False))
    bounded(lambda: H.harvest(tiny, world["corpus"], copy, SITES, activations=True,
                              resume=True, progress=False, **RUN))  # fmt: skip
    assert snapshot(victims) == before, "a file resid did not write was changed"


@FUZZ
@given(data=st.data())
def test_fuzzed_dashboard_output_manifests(world, tmp_path_factory, data):
    """A ``--out`` folder whose manifest (of resid dashboard) lists hostile paths with the
    victims' real hashes: replacing the folder deletes none of them."""
    victims = world["victims"]
    digest = hashlib.sha256(b"not resid's").hexdigest()
    names = data.draw(st.lists(st.one_of(st.text(max_size=30), st.sampled_from([
        "../victims/victim.txt", "../../victims/victim.txt", str(victims / "victim.txt"),
        "x/../../victims/victim.txt", "index.html",
    ])), max_size=4))  # fmt: skip
    work = tmp_path_factory.mktemp("out")
    out = work / "d"
    out.mkdir()
    body = {"writer": "resid dashboard", "files": {n: digest for n in names}}
    (out / files.MANIFEST).write_text(json.dumps(body))
    before = snapshot(victims)
    bounded(lambda: write_dashboard(world["clean"], out, units="0", progress=False))
    assert snapshot(victims) == before, "a file resid did not write was changed"


def jsonl_lines():
    text = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=60)
    record = st.one_of(
        st.builds(lambda t: json.dumps({"text": t}), text),
        st.builds(lambda t: json.dumps({"body": t}), text),
        st.builds(lambda n: '{"text": ' + "[" * n + "]" * n + "}", st.integers(1, 50_000)),
        st.builds(
            lambda n: '{"text": "x", "y": ' + "{" * n + "}" * n + "}", st.integers(1, 50_000)
        ),  # fmt: skip
        st.sampled_from(
            [
                '{"text": "\\ud800"}',
                '{"text": "a\\udfffb"}',
                "[]",
                "null",
                "{",
                '{"text": 5}',
                "",
                "   ",
                '{"text": ""}',
            ]
        ),  # fmt: skip
        st.builds(lambda b: b.decode("latin-1"), st.binary(max_size=40)),
    )
    return st.lists(record, min_size=1, max_size=8)


@FUZZ
@given(lines=jsonl_lines(), raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzzed_jsonl_corpora(tiny, world, tmp_path_factory, lines, raw):
    work = tmp_path_factory.mktemp("corpus")
    path = work / "c.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    before = snapshot(world["victims"])
    bounded(lambda: list(contexts(open_corpus(path), tiny.tokenizer, 6)))
    bounded(lambda: list(contexts(open_corpus(path), tiny.tokenizer, 6, mode="rows")))
    bounded(lambda: H.harvest(tiny, path, work / "h", SITES[:1], context_length=4, batch_size=2,
                              k=2, window=(1, 1), max_tokens=40, progress=False))  # fmt: skip
    assert snapshot(world["victims"]) == before
