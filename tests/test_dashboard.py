"""resid dashboard: pages for every unit, hostile tokens escaped, owned writes, the activation
store over a harvest, and (with Chromium) the pages drawn offline with no errors."""

from __future__ import annotations

import json
import re
import shutil

import chromium
import pytest
import torch

import resid.harvest as H
from resid.cli import main
from resid.core import files
from resid.core.files import ForeignFilesError
from resid.harvest import ActivationStore
from resid.viz.dashboard import _slugs, write_dashboard

SITE = "blocks.1.mlp.hook_post"
HOSTILE = "<script>alert(1)</script>\"'&<img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def harvested(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    corpus = folder / "c.txt"
    lines = [f"The {w} sat on the mat and {v} the {w} again.\n" for w in ("cat", "dog", "owl", "fox")
             for v in ("saw", "fed", "met", "left")]  # fmt: skip
    corpus.write_text("".join(lines * 3))
    out = H.harvest(tiny, corpus, folder / "h", [SITE, "blocks.0.hook_resid_post"],
                    activations=True, context_length=16, batch_size=4, shard_batches=1, k=4,
                    window=(5, 2), progress=False, label=str(tiny.cfg))  # fmt: skip
    return out


def test_pages_for_every_unit_with_logit_effect(tiny, harvested, tmp_path):
    out, n = write_dashboard(harvested, tmp_path / "d", model=tiny, sites=[SITE], units="0-9,20",
                             progress=False)  # fmt: skip
    assert n == 11
    pages = sorted(p.name for p in (out / SITE).iterdir())
    assert pages == sorted(f"{u}.html" for u in [*range(10), 20])
    page = (out / SITE / "3.html").read_text()
    stats = H.load_stats(harvested, SITE)
    assert "Logit effect" in page and "<svg class=hist" in page
    # every top context is there, the ranked token outlined, its exact value on hover
    assert page.count("<p class=ctx>") == int((~stats["top_values"][3].isnan()).sum())
    top = stats["top_values"][3, 0].item()
    assert f": {top:.4g}" in page and 'class="max"' in page
    index = (out / "index.html").read_text()
    assert index.count("<tr><td") == 11 and "addEventListener" in index
    assert "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", index + page)


def test_hostile_tokens_are_escaped(harvested, tmp_path):
    decode = lambda ids: [HOSTILE for _ in ids]  # noqa: E731
    out, _ = write_dashboard(harvested, tmp_path / "d", decode=decode, units="0-1", progress=False)
    for page in (out / SITE / "0.html", out / "index.html"):
        text = page.read_text()
        assert "<script>alert" not in text and "<img" not in text
    text = (out / SITE / "0.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in text


def test_writes_are_owned(harvested, tmp_path):
    out = tmp_path / "d"
    write_dashboard(harvested, out, units="0", progress=False)
    write_dashboard(harvested, out, units="1", progress=False)  # its own output: replaced
    assert (out / SITE / "1.html").exists() and not (out / SITE / "0.html").exists()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ForeignFilesError, match="mine.txt"):
        write_dashboard(harvested, out, units="2", progress=False)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="--units '5000'.*out of range"):
        write_dashboard(harvested, tmp_path / "e", units="5000", progress=False)


def test_cli(harvested, tmp_path, capsys):
    assert main(["dashboard", str(harvested), "--out", str(tmp_path / "d"), "--units", "0-2",
                 "--no-model", "--quiet"]) == 0  # fmt: skip
    assert "6 unit pages" in capsys.readouterr().out  # two sites x 3 units
    assert main(["dashboard", str(tmp_path), "--out", str(tmp_path / "e"), "--no-model"]) == 2
    assert "not a resid harvest folder" in capsys.readouterr().err


def test_activation_store_visits_every_row_once(harvested):
    info = H.read_harvest(harvested)
    every = torch.cat([s[SITE] for s in H.iter_shards(harvested)])
    store = ActivationStore(harvested, SITE, batch_size=50, seed=1, buffer_shards=2)
    batches = list(store)
    assert len(store) == info["tokens"] == len(every)
    assert all(len(b) == 50 for b in batches[:-1]) and 0 < len(batches[-1]) <= 50
    got = torch.cat(batches)
    assert not torch.equal(got, every)  # shuffled …
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(got) == key(every)  # … and every row exactly once
    assert not torch.equal(torch.cat(list(store)), got)  # a new shuffle each epoch
    again = ActivationStore(harvested, SITE, batch_size=50, seed=1, buffer_shards=2)
    assert torch.equal(torch.cat(list(again)), got)  # deterministic given the seed


browser = pytest.mark.skipif(
    chromium.find() is None,
    reason="Chromium not found on PATH (apt-get install chromium; .ci/run installs it)",
)


@browser
def test_pages_draw_offline_in_chromium(tiny, harvested, tmp_path):
    out, _ = write_dashboard(harvested, tmp_path / "d", model=tiny, units="0-7", progress=False)
    probe = """JSON.stringify({spans: document.querySelectorAll('.ctx span[title]').length,
        bars: document.querySelectorAll('svg.hist rect').length})"""
    load = chromium.load((out / SITE / "0.html").as_uri(), probe)
    assert load.errors == []
    assert all(u.startswith("file://") for u in load.requests), load.requests
    state = json.loads(load.value)
    assert state["spans"] > 0 and state["bars"] > 0
    assert chromium.png_pixels(load.screenshot)[..., :3].std() > 20
    # the index sorts by max when its heading is clicked
    probe = """(function(){var th=document.querySelectorAll('table.units th')[2]; th.click();
        return JSON.stringify(Array.from(document.querySelectorAll('table.units tbody tr'))
          .map(r => parseFloat(r.cells[2].dataset.v)));})()"""
    load = chromium.load((out / "index.html").as_uri(), probe)
    assert load.errors == [] and all(u.startswith("file://") for u in load.requests)
    values = json.loads(load.value)
    assert len(values) == 16 and values == sorted(values, reverse=True)


def test_sae_feature_pages(tiny, tmp_path):
    """A spliced SAE's features harvested like any site; with the SAE given, each feature's
    page lists the features and neurons nearest its decoder row, which a plain cosine over
    the weights in the test reproduces."""
    from resid.sae import SAE, SAEConfig

    site = "blocks.1.hook_resid_pre"
    sae = SAE(SAEConfig(d_in=tiny.cfg.d_model, d_sae=32, hook_name=site))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"The {w} sat on the mat.\n" for w in ("cat", "dog", "owl") * 4))
    feature_site = f"{site}.sae.hook_acts"
    with tiny.saes([sae]):
        harvested = H.harvest(tiny, corpus, tmp_path / "h", [feature_site], context_length=8,
                              batch_size=2, k=3, progress=False)  # fmt: skip
    out, n = write_dashboard(harvested, tmp_path / "d", model=tiny, saes=[sae], units="0-3",
                             progress=False)  # fmt: skip
    assert n == 4
    page = (out / feature_site / "2.html").read_text()
    W = sae.W_dec.detach()
    cos = torch.nn.functional.cosine_similarity(W, W[2][None], dim=-1)
    cos[2] = -2
    nearest = int(cos.argmax())
    assert f"<tr><td>feature {nearest}</td><td>{cos[nearest].item():+.3f}</td></tr>" in page
    W_out = torch.cat([b.mlp.W_out.detach() for b in tiny.blocks])
    ncos = torch.nn.functional.cosine_similarity(W_out, W[2][None], dim=-1)
    best = int(ncos.abs().argmax())
    m = tiny.cfg.d_mlp
    assert f"<tr><td>L{best // m}N{best % m}</td><td>{ncos[best].item():+.3f}</td></tr>" in page
    assert "Logit effect" in page


def test_sites_that_would_share_a_folder_get_their_own(harvested, tmp_path):
    """A site named twice gets one folder (it was `File exists`), and names that clean up
    to the same folder name, or to a hidden one, get distinct visible folders."""
    out, n = write_dashboard(harvested, tmp_path / "d", sites=[SITE, SITE], units="0-1",
                             progress=False)  # fmt: skip
    assert n == 2 and sorted(p.name for p in out.iterdir()) == [SITE, "index.html", files.MANIFEST]
    slugs = _slugs(["a b", "a_b", "A_B", "..", ".hidden", "x/../y"])
    assert len(set(slugs.values())) == 6
    assert not any(s.startswith(".") or "/" in s for s in slugs.values()), slugs
    assert slugs["a b"] == "a_b" and slugs["a_b"] == "a_b_2" and slugs["A_B"] == "A_B_3"


def test_a_harvest_without_statistics_or_finished_run_is_a_clear_error(harvested, tmp_path):
    copy = tmp_path / "h"
    shutil.copytree(harvested, copy)
    manifest = json.loads((copy / "resid-manifest.json").read_text())
    manifest["harvest"]["status"] = "running"
    (copy / "resid-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(H.HarvestError, match="unfinished harvest.*--resume"):
        write_dashboard(copy, tmp_path / "d", progress=False)
