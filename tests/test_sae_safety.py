"""SAEs against hostile input and bad luck: saving is atomic and owned (a SIGKILL at any
instant leaves the old SAE or the new one), SAEs that would break every forward are
refused before anything is attached, bad configs and paths end in resid's own error, and
splices belong to the caller's thread or task as hooks do."""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from processes import kill_trials_report
from safetensors.torch import save_file

import resid
from resid.core.files import ForeignFilesError
from resid.sae import SAE, SAEConfig, SAEError

DATA = Path(__file__).parent / "data" / "sae"


def random_sae(site="blocks.1.hook_resid_pre", d_in=64, d_sae=128, seed=0, **cfg) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=site, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return sae


def same_sae(a: SAE, b: SAE) -> bool:
    return a.cfg.to_dict() == b.cfg.to_dict() and all(
        torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


# ---- saving: atomic and owned (issue 20, cause 6) -------------------------------------


def test_save_over_an_earlier_save_leaves_no_stale_file(tmp_path):
    out = tmp_path / "sae"
    resid.sae.save(random_sae(architecture="jumprelu"), out)
    assert (out / "resid-manifest.json").is_file()
    new = random_sae(seed=1)
    resid.sae.save(new, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "cfg.json",
        "resid-manifest.json",
        "sae_weights.safetensors",
    ]
    assert same_sae(resid.sae.load(out), new)
    assert [p for p in tmp_path.iterdir() if p.name != "sae"] == []  # no temporaries left


def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    """SAELens' own folder (with its sparsity.safetensors) is not resid's to replace."""
    theirs = tmp_path / "saelens"
    shutil.copytree(DATA / "standard", theirs)
    save_file({"sparsity": torch.zeros(64)}, theirs / "sparsity.safetensors")
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    with pytest.raises(ForeignFilesError, match="sparsity.safetensors"):
        resid.sae.save(random_sae(d_in=16, d_sae=64), theirs)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    # a file added to a folder resid wrote is not resid's either
    out = tmp_path / "ours"
    resid.sae.save(random_sae(), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        resid.sae.save(random_sae(seed=2), out)
    assert (out / "notes.txt").read_text() == "mine"


def test_saved_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = resid.sae.save(random_sae(), tmp_path / "sae")
    finally:
        os.umask(old)
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p.name


KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import resid
    from resid.sae import SAE, SAEConfig

    folder = sys.argv[1]
    trials = int(sys.argv[2])

    def make(seed, arch):
        sae = SAE(SAEConfig(d_in=256, d_sae=4096, hook_name="blocks.0.hook_resid_pre",
                            architecture=arch))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return sae

    saes = {"a": make(1, "standard"), "b": make(2, "jumprelu")}

    def which():
        try:
            sae = resid.sae.load(folder)
        except Exception as e:
            return f"error: {type(e).__name__}: {e}"
        for name, ref in saes.items():
            if sae.cfg.to_dict() == ref.cfg.to_dict() and all(
                torch.equal(x, y) for x, y in zip(sae.parameters(), ref.parameters())
            ):
                return name
        return "neither"

    times = []
    for name in ("a", "b", "a", "b"):  # the typical time of one save (the median of three)
        start = time.monotonic()
        resid.sae.save(saes[name], folder)
        times.append(time.monotonic() - start)
    seconds = sorted(times[1:])[1]
    results = kill_trials(lambda name: resid.sae.save(saes[name], folder), which, seconds, trials)
    print(json.dumps({"save_seconds": seconds, "results": results}))
    """
)


def test_save_killed_at_random_moments_leaves_old_or_new(tmp_path):
    """SIGKILL at random instants of resid.sae.save (the safetensors write, the manifest,
    the swap), then load: the previous SAE or the new one, every time."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    report = kill_trials_report(KILL_SCRIPT, tmp_path / "sae", 20, env=env)
    results = report["results"]
    assert len(results) == 20
    bad = [r for r in results if r["old"] not in "ab" or r["found"] not in (r["old"], r["new"])]
    assert bad == [], bad
    kept = sum(r["found"] == r["old"] for r in results)
    assert kept >= 1  # some kills landed before the new SAE was in place (the point)
    print(f"sae save took {report['save_seconds']:.3f} s; kept old {kept}, got new {20 - kept}")


# ---- SAEs that would break every forward are refused (cause 8) ------------------------


@pytest.mark.parametrize(
    "site, cfg, match",
    [
        ("blocks.1.attn.hook_q", {}, r"per-head site 'blocks.1.attn.hook_q'.*reshape_activations"),
        ("blocks.1.attn.hook_z", {}, r"per-head site 'blocks.1.attn.hook_z'.*hook_z"),
        (
            "blocks.1.attn.hook_z",
            {"d_in": 32, "reshape_activations": "hook_z"},
            r"d_in=32.*'blocks.1.attn.hook_z'.*width 64",
        ),
        (
            "blocks.1.hook_resid_pre",
            {"reshape_activations": "hook_z"},
            r"flattens heads.*'blocks.1.hook_resid_pre'",
        ),
        ("blocks.1.attn.hook_pattern", {}, r"'blocks.1.attn.hook_pattern'.*not one vector"),
        ("blocks.1.attn.hook_attn_scores", {}, r"hook_attn_scores.*not one vector"),
        ("ln_final.hook_scale", {"d_in": 1}, r"'ln_final.hook_scale'.*not one vector"),
        ("hook_tokens", {"d_in": 1}, r"'hook_tokens'.*not one vector"),
        ("blocks.1.mlp.hook_post", {}, r"d_in=64.*'blocks.1.mlp.hook_post'.*width 256"),
    ],
)
def test_saes_that_break_every_forward_are_refused_at_splice(tiny, tokens, site, cfg, match):
    names = list(tiny.hook_dict)
    sae = random_sae(site=site, **{"d_in": 64, **cfg})
    with pytest.raises(SAEError, match=match) as err:
        with tiny.saes([sae]):
            pass
    assert repr(sae) in str(err.value)  # the SAE is named, and the site
    assert tiny.attached_hooks() == [] and list(tiny.hook_dict) == names
    assert resid.sae.site_width(tiny, site, sae.cfg.reshape_activations) in (None, 256, 64)


@pytest.mark.parametrize(
    "site, d_in",
    [
        ("blocks.1.attn.hook_q", 64),
        ("blocks.0.attn.hook_k", 64),
        ("blocks.1.attn.hook_v", 64),
        ("blocks.1.attn.hook_z", 64),
    ],
)
def test_per_head_saes_that_flatten_the_heads_run(tiny, tokens, site, d_in):
    """The other side of the check: where heads are flattened, the SAE runs, exactly with
    its error term, and changes the logits without it."""
    sae = random_sae(site=site, d_in=d_in, reshape_activations="hook_z")
    with torch.no_grad():
        ref = tiny(tokens)
        with tiny.saes([sae]):
            assert torch.equal(tiny(tokens), ref)
        with tiny.saes([sae], use_error_term=False):
            assert not torch.allclose(tiny(tokens), ref, atol=1e-3)


# ---- bad configs and paths end in resid's own error (cause 9) ----------------------------


def sae_folder(tmp_path: Path, cfg_text: str) -> Path:
    folder = tmp_path / "sae"
    shutil.copytree(DATA / "standard", folder)
    (folder / "cfg.json").write_text(cfg_text)
    return folder


def test_deeply_nested_cfg_json_is_an_sae_error(tmp_path):
    for depth in (40, 100_000):
        text = '{"d_in": 16, "metadata": ' + "[" * depth + "]" * depth + "}"
        with pytest.raises(SAEError, match="nest"):
            resid.sae.load(sae_folder(tmp_path / str(depth), text))


def test_a_path_that_is_not_a_folder_is_resids_error_not_the_hubs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args in (("../no-such-dir", "sub"), ("./x/y", "sub"), ("a/b/c", "sub"), ("/abs/x", None)):
        with pytest.raises(SAEError, match="not a folder"):
            resid.sae.load(*args)
    sae_folder(tmp_path, (DATA / "standard" / "cfg.json").read_text())
    for sae_id in ("../sae", "/etc", "a/../../b", "x\\y"):
        with pytest.raises(SAEError, match="SAE id"):
            resid.sae.load(tmp_path, sae_id)
    assert resid.sae.load(tmp_path, "sae").d_sae == 64  # a real subfolder is found


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_in", 10**12, "d_in must be a positive integer"),
        ("d_sae", 2**40, "d_sae must be a positive integer"),
        ("d_in", "16", "d_in must be a positive integer"),
        ("d_in", 16.0, "d_in must be a positive integer"),
        ("d_sae", True, "d_sae must be a positive integer"),
        ("k", 10**9, "k"),
        ("architecture", ["topk"], "unknown architecture"),
        ("dtype", {"a": 1}, "dtype"),
        ("dtype", "int8", "dtype"),
        ("apply_b_dec_to_input", "yes", "apply_b_dec_to_input must be true or false"),
        ("reshape_activations", "heads", "reshape_activations"),
        ("metadata", [1], "metadata must be an object"),
        ("hook_name", 7, "hook name"),
        ("hook_name", "x" * 1000, "hook name"),
    ],
)
def test_every_cfg_field_is_checked_before_allocation(tmp_path, field, value, match):
    cfg = json.loads((DATA / "standard" / "cfg.json").read_text())
    if field == "hook_name":
        cfg["metadata"]["hook_name"] = value
    else:
        cfg[field] = value
    if field == "k":
        cfg["architecture"] = "topk"
    start = time.perf_counter()
    with pytest.raises(SAEError, match=match):
        resid.sae.load(sae_folder(tmp_path, json.dumps(cfg)))
    assert time.perf_counter() - start < 1.0


def test_cfg_json_that_is_not_a_regular_small_file(tmp_path):
    folder = sae_folder(tmp_path, "{}")
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").mkdir()
    with pytest.raises(SAEError, match="cfg.json"):
        resid.sae.load(folder)
    (folder / "cfg.json").rmdir()
    (folder / "cfg.json").symlink_to("/dev/zero")
    with pytest.raises(SAEError, match="cfg.json"):
        resid.sae.load(folder)
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(SAEError, match="cfg.json"):
        resid.sae.load(folder)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((DATA / "standard" / "cfg.json").read_text())
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").symlink_to(outside)
    with pytest.raises(SAEError, match="outside"):
        resid.sae.load(folder)


# ---- splices follow the caller's context, as hooks do (cause 10) --------------------------


def test_two_threads_splice_the_same_site_at_once(tiny, tokens):
    """Each thread splices its own SAE at the same site, at the same time; each sees its
    own SAE's features and nothing of the other's."""
    saes = [random_sae(seed=s) for s in (1, 2)]
    with torch.no_grad(), tiny.saes([saes[0]]):  # what each thread must see, computed alone
        _, c0 = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith("sae.hook_acts"))
    with torch.no_grad(), tiny.saes([saes[1]]):
        _, c1 = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith("sae.hook_acts"))
    want = [
        c0["blocks.1.hook_resid_pre.sae.hook_acts"],
        c1["blocks.1.hook_resid_pre.sae.hook_acts"],
    ]
    inside = threading.Barrier(2, timeout=30)
    results: dict[int, object] = {}

    def work(i: int) -> None:
        try:
            with torch.no_grad(), tiny.saes([saes[i]]):
                inside.wait()  # both spliced at once
                _, cache = tiny.run_with_cache(
                    tokens, names_filter=lambda n: n.endswith("sae.hook_acts")
                )
                inside.wait()
            results[i] = cache["blocks.1.hook_resid_pre.sae.hook_acts"]
        except BaseException as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in (0, 1):
        assert isinstance(results[i], torch.Tensor), results[i]
        assert torch.equal(results[i], want[i])
    assert tiny.attached_hooks() == []
    assert not any(".sae." in n for n in tiny.hook_dict)


def test_a_splice_is_invisible_to_other_threads_and_copied_contexts_keep_it(tiny, tokens):
    sae = random_sae()
    name = sae.name_of("hook_acts")
    seen = {}

    def look(key: str) -> None:
        seen[key] = name in tiny.hook_dict

    with tiny.saes([sae]):
        t = threading.Thread(target=look, args=("other thread",))
        t.start()
        t.join()
        contextvars.copy_context().run(look, "copied context")
        look("here")
    look("after")
    assert seen == {"other thread": False, "copied context": True, "here": True, "after": False}
