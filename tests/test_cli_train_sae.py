"""`resid train-sae` (resid.cli_train, run by resid.cli): its saved SAE or transcoder
against ``resid.sae.training.train`` called here directly on the same data (a tiny harvest;
a tiny model's activations on the fly), bit for bit; scripts/train_sae.py's distributed
path gives the same bits; a run killed after a checkpoint and resumed with --resume ends
where the straight run does; bad options fail with exit 2 (argparse) or 1 and a one-line
message, writing nothing; torchrun passes every option through; and two torchrun ranks of
``-m resid.cli train-sae`` train what one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import free_port

import resid
import resid.harvest as H
from resid.cli import main
from resid.core import files
from resid.harvest.streams import HarvestStreams
from resid.sae.model_streams import ModelStreams
from resid.sae.training import TrainConfig, build, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_sae.py"
SITE = "blocks.1.hook_resid_post"
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
N, POS = 24, 12

# one run's options, and the same run as a TrainConfig written out by hand
ARGS = ["--arch", "topk", "--d-sae", "32", "--k", "4", "--steps", "24", "--batch-size", "16",
        "--streams", "2", "--seed", "5", "--warmup", "4", "--lr", "0.003",
        "--checkpoint-every", "10", "--device", "cpu", "--quiet"]  # fmt: skip
CFG = TrainConfig(architecture="topk", d_sae=32, k=4, steps=24, batch_size=16, streams=2,
                  seed=5, warmup=4, lr=0.003, checkpoint_every=10)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> resid.Model:
    torch.manual_seed(0)
    cfg = resid.Config(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, n_ctx=32)
    return resid.Model(cfg)  # GPT-2's vocabulary: its tokenizer, offline


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> dict:
    """The model saved, its token ids ([24, 12], right-padded, with the mask) as a .pt, and
    a harvest of its activations at the SAE's and the transcoder's sites."""
    folder = tmp_path_factory.mktemp("train-sae")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50257, (N, POS), generator=g)
    lengths = torch.randint(4, POS + 1, (N,), generator=g)
    mask = torch.arange(POS)[None, :] < lengths[:, None]
    torch.save({"tokens": tokens, "attention_mask": mask}, folder / "tokens.pt")
    corpus = folder / "c.txt"
    words = ("cat", "dog", "owl", "fox", "hen", "elk")
    corpus.write_text(
        "".join(f"The {w} saw the {v} and the {w} ran.\n" for w in words for v in words)
    )
    harvest = H.harvest(model, corpus, folder / "h", [SITE, TC_IN, TC_OUT], activations=True,
                        context_length=16, batch_size=4, shard_batches=1, k=2, window=(1, 1),
                        progress=False, label="tiny")  # fmt: skip
    return {"model": resid.save(model, folder / "model"), "tokens": folder / "tokens.pt",
            "tokens_mask": (tokens, mask), "harvest": harvest}  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The dictionary rank 0 saved in a checkpoint folder (an SAE or a transcoder)."""
    cfg = json.loads((folder / "sae" / "cfg.json").read_text())
    if "hook_name_out" in cfg or "d_out" in cfg:
        (d,) = resid.sae.load_transcoders(folder / "sae")
    else:
        d = resid.sae.load(folder / "sae")
    return {k: getattr(d, k).detach() for k in d.cfg.shapes()}


def assert_equal(got: dict, direct) -> None:
    assert set(got) == set(direct.cfg.shapes())
    for k, v in got.items():
        assert torch.equal(v, getattr(direct, k)), k


def cli(*argv: str) -> int:
    return main(["train-sae", *argv])


def test_on_the_fly_equals_train_called_directly(model, saved, tmp_path, capsys):
    out = tmp_path / "fly"
    code = cli("--model", str(saved["model"]), "--tokens", str(saved["tokens"]), "--site", SITE,
               "--buffer-sequences", "8", *ARGS, "--out", str(out))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == (
        f"trained SAE(topk, k=4, d_in=32, d_sae=32, hook_name='{SITE}') for 24 steps on "
        f"1 rank(s) -> {out}\n"
    )
    tokens, mask = saved["tokens_mask"]
    data = ModelStreams(model, tokens, SITE, 2, 5, attention_mask=mask, buffer_sequences=8)
    direct = train(data, CFG, tmp_path / "direct", SITE, progress=False)
    assert_equal(weights(out), direct)
    assert not torch.equal(direct.W_dec, build(CFG, data.widths, data.mean(), SITE).W_dec)
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 24 and record["config"] == CFG.to_dict()


def test_harvest_sae_and_transcoder_equal_train_called_directly(saved, tmp_path, monkeypatch):
    h = saved["harvest"]
    assert cli("--harvest", str(h), "--site", SITE, *ARGS, "--out", str(tmp_path / "sae")) == 0
    direct = train(HarvestStreams(h, [SITE], 2, seed=5), CFG, tmp_path / "d", SITE, progress=False)
    assert_equal(weights(tmp_path / "sae"), direct)
    # the script's distributed path runs the same code: the same bits
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_sae
    finally:
        sys.path.remove(str(SCRIPT.parent))
    monkeypatch.setattr(sys, "argv", ["train_sae.py", "--harvest", str(h), "--site", SITE,
                                      *ARGS, "--out", str(tmp_path / "script")])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        train_sae.main()
    assert done.value.code == 0
    assert_equal(weights(tmp_path / "script"), direct)
    # a skip transcoder from TC_IN to TC_OUT, standard (ReLU, L1)
    tc_args = ["--site", TC_IN, "--site-out", TC_OUT, "--skip", "--arch", "standard", "--l1",
               "0.01", "--d-sae", "24", "--steps", "12", "--batch-size", "8", "--streams", "2",
               "--warmup", "3", "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli("--harvest", str(h), *tc_args, "--out", str(tmp_path / "tc")) == 0
    cfg = TrainConfig(architecture="standard", l1=0.01, d_sae=24, steps=12, batch_size=8,
                      streams=2, warmup=3)  # fmt: skip
    data = HarvestStreams(h, [TC_IN, TC_OUT], 2)
    tc = train(data, cfg, tmp_path / "tc-direct", TC_IN, TC_OUT, skip=True, progress=False)
    assert tc.W_skip is not None
    assert_equal(weights(tmp_path / "tc"), tc)


def test_resume_after_a_kill_equals_the_straight_run(saved, tmp_path):
    """`python -m resid.cli train-sae` on the fly, SIGKILLed after its checkpoint at step
    20, then the same command with --resume: the straight run's weights and optimizer state,
    bit for bit."""
    steps = ["--steps", "1000", "--checkpoint-every", "20", "--log-every", "20"]
    argv = ["--model", str(saved["model"]), "--tokens", str(saved["tokens"]), "--site", SITE,
            "--buffer-sequences", "8", *ARGS, *steps]  # fmt: skip
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "resid.cli", "train-sae", *argv, "--out",
                             str(cut), "--log-checkpoints"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "checkpoint step 20 " in line:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert seen and seen[-1] == f"resid train-sae: checkpoint step 20 -> {cut}\n", seen[-5:]
    step = json.loads((cut / "training.json").read_text())["step"]
    assert 20 <= step < 1000 and proc.returncode == -signal.SIGKILL
    assert cli(*argv, "--out", str(cut), "--resume") == 0
    assert cli(*argv, "--out", str(tmp_path / "straight")) == 0
    resumed, straight = weights(cut), weights(tmp_path / "straight")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    a, b = (files.read_regular(f / "state.safetensors", 1 << 24) for f in (cut, tmp_path / "straight"))  # fmt: skip
    assert a == b  # Adam's moments and the dead-feature counters too


BAD = [
    ([], "no data to train on: give --harvest DIR"),
    (["--harvest", "{h}", "--tokens", "{t}", "--model", "{m}"], "give one data source, not --harvest and --tokens"),
    (["--tokens", "{t}"], "--tokens computes activations on the fly: name the model with --model"),
    (["--synthetic", "12x5"], "--synthetic takes ROWS,WIDTH"),
    (["--synthetic", "100000000,100000"], "at most 2^30 numbers"),
    (["--harvest", "{h}", "--d-sae", "0"], "--d-sae must be an integer in [1, "),
    (["--harvest", "{h}", "--streams", "0"], "--streams must be an integer in [1, "),
    (["--harvest", "{h}", "--k", "64"], "k=64 is more than d_sae=32"),
    (["--harvest", "{h}", "--batch-size", "15"], "--batch-size 15 is not a multiple of streams 2"),
    (["--synthetic", "100,8", "--site-out", TC_OUT], "--synthetic gives rows at one site"),
    (["--harvest", "{missing}"], "missing"),
    (["--harvest", "{h}", "--site-out", TC_OUT], "top-k transcoder"),
    (["--harvest", "{h}", "--resume"], "no training checkpoint"),
    (["--model", "{m}", "--tokens", "{t}", "--site", "blocks.1.hook_resid_psot"], "hook_resid_post"),
    (["--model", "{m}", "--tokens", "{c}"], "a .pt or .npy file of token ids"),
    (["--model", "{m}", "--text", "{c}", "--context-length", "1"], "--context-length must be in [2, 32]"),
    (["--model", "{missing}", "--tokens", "{t}"], "missing"),
]  # fmt: skip


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_options_exit_1_with_one_clear_line_and_write_nothing(
    saved, tmp_path, capsys, bad, message
):
    paths = {"h": saved["harvest"], "t": saved["tokens"], "m": saved["model"],
             "missing": tmp_path / "missing", "c": tmp_path / "c.txt"}  # fmt: skip
    (tmp_path / "c.txt").write_text("The cat sat on the mat. " * 20)
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in bad]
    if "--site" not in argv:
        argv += ["--site", SITE]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli(*ARGS, *argv, "--out", str(tmp_path / "out"))  # the bad option last: it wins
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("resid train-sae (rank 0): error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, nothing else


def test_an_output_folder_in_use_is_refused_and_kept(saved, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli("--harvest", str(saved["harvest"]), "--site", SITE, *ARGS, "--out", str(mine)) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "argv, message",
    [([], "the following arguments are required: --site, --out"),
     (["--site", SITE, "--out", "x", "--arch", "gated"], "invalid choice: 'gated'"),
     (["--site", SITE, "--out", "x", "--steps", "many"], "invalid int value: 'many'")],
)  # fmt: skip
def test_option_errors_exit_2(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli(*argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "resid train-sae: error: " in err and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        cli("--help")
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--harvest", "--tokens", "--text", "--model", "--site-out", "--skip",
                   "--resume", "--streams", "--dist-timeout", "torchrun"):  # fmt: skip
        assert option in out, option


def test_torchrun_passes_every_option_to_the_command():
    """torchrun parses its whole command line with argparse, which takes an abbreviation of
    its own options (``--log`` for ``--log-dir``) even after the module: none of
    train-sae's options may be one."""
    import argparse

    from torch.distributed.run import parse_args

    from resid.cli_train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    options = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
    assert len(options) > 35 and "--site-out" in options and "--harvest" in options
    for option in options:
        argv = ["--nproc-per-node", "2", "-m", "resid.cli", "train-sae", option, "1"]
        got = parse_args(argv)
        assert got.module and got.training_script == "resid.cli", option
        assert got.training_script_args == ["train-sae", option, "1"], option


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(saved, tmp_path):
    """The README's command, `torchrun --nproc-per-node 2 -m resid.cli train-sae`, on the
    harvest: what train() on one process gives, within float summation order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "resid.cli",
            "train-sae", "--harvest", str(saved["harvest"]), "--site", SITE, *ARGS,
            "--dist-timeout", "60", "--out", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 rank(s)" in done.stdout
    data = HarvestStreams(saved["harvest"], [SITE], 2, seed=5)
    one = train(data, CFG, tmp_path / "one", SITE, progress=False)
    two = weights(tmp_path / "two")
    worst = max((getattr(one, k) - two[k]).abs().max().item() for k in two)
    print(f"max |2 ranks - 1 rank| = {worst:.3g}")
    assert worst <= 1e-5
