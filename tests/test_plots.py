"""`resid attention` and resid.viz.plots on the tiny model: figures against the model's own
`hook_pattern` and `to_str_tokens`, the files written, and every bad input's exit."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from chromium import png_pixels

from resid.cli import main
from resid.viz.attention_pages import write_attention
from resid.viz.plots import attention_heads, display_token, parse_indices, token_labels

PROMPT = "The cat sat on the mat.\nThe cat\tsat  down"


def test_display_token_mapping():
    assert display_token(" cat") == "·cat"
    assert display_token("\n\n") == "⏎⏎"
    assert display_token("\t x\r") == "⇥·x␍"
    assert display_token("\x00") == "\\x00"
    assert display_token("") == "∅"
    assert token_labels(["a", "a"]) == ["0 a", "1 a"]  # unique, even for repeated tokens


def test_parse_indices():
    assert parse_indices("0,3-5", 12) == [0, 3, 4, 5]
    assert parse_indices(None, 3) == [0, 1, 2]
    assert parse_indices([2, 1, 2], 3) == [1, 2]
    for bad, match in [("12", "out of range.*0-11"), ("5-3", "backwards"), ("x", "cannot read")]:
        with pytest.raises(ValueError, match=match):
            parse_indices(bad, 12)


def test_heatmaps_are_the_models_patterns(tiny):
    figs = attention_heads(tiny, PROMPT)
    n_layers, n_heads = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert sorted(figs) == [(la, h) for la in range(n_layers) for h in range(n_heads)]
    _, cache = tiny.run_with_cache(PROMPT, names_filter=lambda n: n.endswith("hook_pattern"))
    str_tokens = tiny.to_str_tokens(PROMPT)
    labels = [f"{i} {display_token(t)}" for i, t in enumerate(str_tokens)]
    n = len(str_tokens)
    above = np.triu(np.ones((n, n), dtype=bool), k=1)
    for (layer, head), fig in figs.items():
        heat = fig.data[0]
        z = np.asarray(heat.z, dtype=np.float64)
        expected = cache[f"blocks.{layer}.attn.hook_pattern"][0, head].double().numpy()
        assert np.isnan(z[above]).all(), "keys after the query must be masked (NaN), not 0"
        np.testing.assert_array_equal(z[~above], expected[~above].astype(np.float32))
        assert list(heat.x) == labels and list(heat.y) == labels
        assert (heat.zmin, heat.zmax) == (0, 1)
        assert "%{z" in heat.hovertemplate
    # the labels are the tokenizer's strings, whitespace shown: ' cat' -> '·cat', '\n' -> '⏎'
    assert "2 ·cat" in labels and any("⏎" in lbl for lbl in labels)


def test_selected_layers_and_heads(tiny):
    figs = attention_heads(tiny, "Hello world", layers="1", heads=[0, 2])
    assert sorted(figs) == [(1, 0), (1, 2)]


def test_written_files(tiny, tmp_path):
    out = tmp_path / "attn"
    folder, n_plots, notes = write_attention(tiny, PROMPT, out, layers=[0, 1], heads="1-2",
                                             progress=False)  # fmt: skip
    assert folder == out and n_plots == 4 and notes == []
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "L0H1.html",
        "L0H2.html",
        "L1H1.html",
        "L1H2.html",
        "index.html",
        "plotly.min.js",
        "resid-manifest.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["attn"]  # no staging folder left behind
    index = (out / "index.html").read_text()
    assert sorted(set(re.findall(r'href="(L\dH\d)\.html"', index))) == [
        "L0H1",
        "L0H2",
        "L1H1",
        "L1H2",
    ]
    for page in out.glob("L*.html"):
        text = page.read_text()
        assert '<script src="plotly.min.js"' in text
        assert "cdn" not in text.lower() and "https://" not in text
    # thumbnails: one pixel per cell, transparent exactly where the heatmap is masked
    thumbs = re.findall(r'src="data:image/png;base64,([^"]+)"', index)
    assert len(thumbs) == 4
    n = len(tiny.to_str_tokens(PROMPT))
    alpha = png_pixels(base64.b64decode(thumbs[0]))[..., 3]
    assert alpha.shape == (n, n)
    np.testing.assert_array_equal(alpha == 0, np.triu(np.ones((n, n), dtype=bool), k=1))


def test_many_prompts_share_one_plotly_js(tiny, tmp_path):
    out = tmp_path / "many"
    _, n_plots, _ = write_attention(tiny, ["first prompt", "second one"], out, layers="0",
                                    progress=False)  # fmt: skip
    assert n_plots == 2 * tiny.cfg.n_heads
    assert sorted(p.name for p in out.iterdir()) == [
        "01-first-prompt", "02-second-one", "index.html", "plotly.min.js", "resid-manifest.json"]  # fmt: skip
    page = (out / "02-second-one" / "L0H0.html").read_text()
    assert '<script src="../plotly.min.js"' in page
    assert len(list((out / "01-first-prompt").glob("*.html"))) == tiny.cfg.n_heads + 1


def test_cli_writes_and_rewrites(tiny_dir, tmp_path, capsys):
    out = tmp_path / "attn"
    argv = ["attention", str(tiny_dir), PROMPT, "--out", str(out), "--quiet", "--device", "cpu"]
    assert main([*argv, "--heads", "0,3", "--format", "html,png"]) == 0
    captured = capsys.readouterr()
    assert f"wrote 4 head plots for 1 prompt to {out}/" in captured.out
    assert sorted(p.name for p in out.glob("L*.html")) == [
        "L0H0.html", "L0H3.html", "L1H0.html", "L1H3.html"]  # fmt: skip
    pngs = list(out.glob("L*.png"))
    # PNG export works where kaleido and Chrome do; elsewhere one line says why, HTML is there
    if len(pngs) != 4:
        assert pngs == []
        notes = [ln for ln in captured.err.splitlines() if "PNG export skipped" in ln]
        assert len(notes) == 1, captured.err
    else:
        assert png_pixels(pngs[0].read_bytes())[..., :3].std() > 5
    # a second run replaces an earlier resid attention output, whole
    assert main([*argv, "--layers", "1"]) == 0
    assert sorted(p.name for p in out.glob("L*")) == [f"L1H{h}.html" for h in range(4)]
    assert [p.name for p in tmp_path.iterdir()] == ["attn"]


def test_cli_prompts_file(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\n\n  \nfour five\n")
    out = tmp_path / "out"
    assert main(["attention", str(tiny_dir), "--prompts-file", str(prompts), "--out", str(out),
                 "--layers", "1", "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "01-one-two-three",
        "02-four-five",
    ]
    assert "for 2 prompts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-model", "hi"], "neither a file, a folder, nor a known model"),
        (["{model}", ""], "the prompt is empty"),
        (["{model}"], "give a prompt"),
        (["{model}", "hi", "--layers", "2"], "layer 2 is out of range: this model has layers 0-1"),
        (["{model}", "hi", "--layers", "0-1", "--heads", "7"], "head 7 is out of range"),
        (["{model}", "word " * 80], "more than the context of 64: shorten it, or pass --truncate"),
        (["{model}", "hi", "--out", "{file}/sub"], "cannot write to"),
        (["{model}", "hi", "--out", "{file}"], "exists and is not a folder"),
        (["{model}", "hi", "--format", "gif"], "unknown --format 'gif'"),
        (["{model}", "--prompts-file", "{missing}"], "cannot read --prompts-file"),
    ],
)
def test_cli_bad_input(tiny_dir, tmp_path, capsys, args, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    fill = dict(model=str(tiny_dir), file=str(a_file), missing=str(tmp_path / "nope.txt"))
    argv = ["attention", *(a.format(**fill) for a in args), "--device", "cpu", "--quiet"]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "attn")]
    before = sorted(tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("resid attention: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == before, "nothing may be left behind"


def test_long_prompt_truncated_on_request(tiny_dir, tmp_path, capsys):
    out = tmp_path / "attn"
    argv = ["attention", str(tiny_dir), " ".join(["word"] * 80), "--truncate", "--layers", "0", "--heads", "0",
            "--out", str(out), "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "warning: the prompt is 81 tokens; keeping the first 64" in capsys.readouterr().err
    assert (out / "index.html").read_text().count('<span title="position') == 64


def test_failure_midway_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "attn"
    with pytest.raises(ValueError, match="the prompt is empty"):
        write_attention(tiny, ["fine", ""], out, progress=False)
    assert list(tmp_path.iterdir()) == []
