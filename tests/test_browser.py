"""The pages `resid attention` writes, opened in real headless Chromium with no network:
no JavaScript errors, nothing requested but local files, and something drawn."""

from __future__ import annotations

import json

import chromium
import pytest
from conftest import TINY

from resid.viz.attention_pages import write_attention

pytestmark = pytest.mark.skipif(
    chromium.find() is None,
    reason="Chromium not found on PATH (apt-get install chromium; .ci/run installs it)",
)

PROMPT = "When Mary and John went to the store, John gave a drink to Mary"


@pytest.fixture(scope="module")
def pages(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "attn"
    write_attention(tiny, PROMPT, out, progress=False)
    return out


def only_local(requests: list[str]) -> bool:
    return all(url.startswith(("file://", "data:")) for url in requests)


def test_the_harness_sees_errors_and_network(tmp_path):
    """A broken page must fail the checks below, or they prove nothing."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<script src="https://cdn.plot.ly/plotly-2.0.0.min.js"></script>'
        "<script>console.error('boom'); notAFunction();</script>"
    )
    load = chromium.load(page.as_uri())
    assert not only_local(load.requests)
    assert any("notAFunction" in e for e in load.errors) and "boom" in load.errors
    assert chromium.png_pixels(load.screenshot).std() < 1  # a blank page is blank


def test_head_page_draws_offline(pages):
    probe = """JSON.stringify({plotly: typeof Plotly,
        plots: document.querySelectorAll('.js-plotly-plot').length,
        heatmaps: document.querySelectorAll('.js-plotly-plot .hm image').length,
        ticks: Array.from(document.querySelectorAll('.xtick text')).map(t => t.textContent)})"""
    load = chromium.load((pages / "L1H2.html").as_uri(), probe)
    assert load.errors == []
    assert only_local(load.requests), load.requests
    assert any(u.endswith("/plotly.min.js") for u in load.requests)
    state = json.loads(load.value)
    assert state["plotly"] == "object" and state["plots"] == 1 and state["heatmaps"] == 1
    assert "2 ·Mary" in state["ticks"]  # token labels as drawn
    pixels = chromium.png_pixels(load.screenshot)[..., :3]
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    assert (pixels.min(-1) < 200).mean() > 0.05  # a good share of coloured/dark pixels


def test_index_page_draws_offline(pages):
    probe = """JSON.stringify({images: document.images.length,
        drawn: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,
        links: document.querySelectorAll('a[href$=".html"]').length})"""
    load = chromium.load((pages / "index.html").as_uri(), probe)
    assert load.errors == []
    assert only_local(load.requests), load.requests
    n_heads = TINY["n_layer"] * TINY["n_head"]
    state = json.loads(load.value)
    assert state["images"] == state["drawn"] == n_heads
    assert state["links"] >= n_heads
    assert chromium.png_pixels(load.screenshot)[..., :3].std() > 20
