"""Distributed SAE training (resid.sae.training, scripts/train_sae.py): two ranks on gloo
against one rank and against a plain training loop written here; a rank killed with
SIGKILL fails the other with a clear message, and --resume then equals the uninterrupted
run bit for bit; the JumpReLU's straight-through gradients against their formulas; the
streams against the harvest's rows; checkpoints owned and checked."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from processes import finish_ranks, launch_ranks

import resid
import resid.harvest as H
from resid.core import files
from resid.harvest.streams import HarvestStreams
from resid.sae.training import (
    Objective,
    TensorStreams,
    TrainConfig,
    TrainingError,
    _JumpReLU,
    _Step,
    build,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_sae.py"
SITE = "blocks.1.hook_resid_pre"
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
# the run the multi-process tests share: long enough that a kill lands mid-run
CFG = dict(architecture="topk", d_sae=48, k=6, steps=240, batch_size=64, streams=2, seed=3,
           warmup=20, checkpoint_every=30, lr=3e-3)  # fmt: skip
TIMEOUT_S = 20  # the process group's timeout in these runs
SILENT_TIMEOUT_S = 8  # also the rendezvous's: long enough for a loaded machine's start skew


@pytest.fixture(scope="module")
def harvested(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    corpus = folder / "c.txt"
    words = ("cat", "dog", "owl", "fox", "hen", "elk")
    corpus.write_text(
        "".join(f"The {w} saw the {v} and the {w} ran.\n" for w in words for v in words)
    )
    return H.harvest(tiny, corpus, folder / "h", [SITE, TC_IN, TC_OUT], activations=True,
                     context_length=16, batch_size=4, shard_batches=1, k=2, window=(1, 1),
                     progress=False, label="tiny")  # fmt: skip


def _argv(harvest: Path, out: Path, *extra: str) -> list[str]:
    c = CFG
    return [sys.executable, str(SCRIPT), "--harvest", str(harvest), "--site", SITE,
            "--arch", c["architecture"], "--d-sae", str(c["d_sae"]), "--k", str(c["k"]),
            "--steps", str(c["steps"]), "--batch-size", str(c["batch_size"]),
            "--streams", str(c["streams"]), "--seed", str(c["seed"]), "--warmup", str(c["warmup"]),
            "--checkpoint-every", str(c["checkpoint_every"]), "--lr", str(c["lr"]),
            "--out", str(out), "--quiet", "--dist-timeout", str(TIMEOUT_S), *extra]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    sae = resid.sae.load(folder / "sae")
    return {k: getattr(sae, k).detach() for k in sae.cfg.shapes()}


@pytest.fixture(scope="module")
def runs(harvested, tmp_path_factory) -> dict:
    """Three runs of two gloo ranks, started together (start-up is most of their time):
    ``clean``, uninterrupted; ``killed``, rank 1 SIGKILLed after rank 0's checkpoint at
    step 30; ``silent``, rank 1 SIGSTOPped after step 20 with an 8 s timeout. For the
    last two: (rank 0's return code, its stderr, seconds from the signal to its exit)."""
    root = tmp_path_factory.mktemp("runs")
    silent_argv = [sys.executable, str(SCRIPT), "--synthetic", "2048,8", "--d-sae", "16", "--k",
                   "2", "--steps", "100000", "--batch-size", "16", "--streams", "2",
                   "--checkpoint-every", "20", "--quiet", "--log-checkpoints", "--dist-timeout",
                   str(SILENT_TIMEOUT_S), "--out", str(root / "silent")]  # fmt: skip
    launched = {
        "clean": launch_ranks(_argv(harvested, root / "clean")),
        "killed": launch_ranks(_argv(harvested, root / "killed", "--log-checkpoints")),
        "silent": launch_ranks(silent_argv),
    }
    out: dict = {"root": root}

    def watch(name: str, step: int, sig: int) -> None:
        procs = launched[name]
        for line in procs[0].stderr:  # rank 0 logs its checkpoints
            if f"checkpoint step {step} " in line:
                break
        procs[1].send_signal(sig)
        t0 = time.perf_counter()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 60)
        out[name] = (procs[0].returncode, err, time.perf_counter() - t0)

    threads = [threading.Thread(target=watch, args=("killed", 30, signal.SIGKILL)),
               threading.Thread(target=watch, args=("silent", 20, signal.SIGSTOP))]  # fmt: skip
    try:
        for t in threads:
            t.start()
        finish_ranks(launched["clean"], timeout=120)
        for t in threads:
            t.join(timeout=TIMEOUT_S + 120)
    finally:
        for procs in launched.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
    return out


def _reference(data: HarvestStreams, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """One process, no DDP, no checkpoints: a top-k SAE trained with plain Adam on the
    global batches (every stream's rows, in stream order), its learning rate set by hand."""
    sae = build(cfg, data.widths, data.mean(), SITE)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    batches = data.batches(range(cfg.streams), cfg.batch_size // cfg.streams, 0)
    for step in range(cfg.steps):
        (x,) = next(batches)
        warm = min(1.0, (step + 1) / cfg.warmup)
        decay = (cfg.steps - step) / (cfg.steps / 5)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(warm, decay)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(cfg.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        loss = (acts @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: getattr(sae, k).detach() for k in sae.cfg.shapes()}


@pytest.mark.slow
def test_two_ranks_equal_one_and_a_plain_loop(harvested, runs, tmp_path):
    two_ranks = runs["root"] / "clean"
    cfg = TrainConfig(**CFG)
    data = HarvestStreams(harvested, [SITE], cfg.streams, seed=cfg.seed)
    one = train(data, cfg, tmp_path / "one", SITE, progress=False)
    two = _weights(two_ranks)
    plain = _reference(data, cfg)
    worst = max((getattr(one, k) - two[k]).abs().max().item() for k in two)
    print(f"max |2 ranks - 1 rank| = {worst:.3g}")
    assert worst <= 1e-5
    for k in two:
        torch.testing.assert_close(getattr(one, k), plain[k], rtol=0, atol=1e-5)
    assert not torch.equal(two["W_dec"], build(cfg, data.widths, data.mean(), SITE).W_dec)
    record = json.loads((two_ranks / "training.json").read_text())
    assert record["step"] == cfg.steps and record["config"] == cfg.to_dict()


@pytest.mark.slow
def test_killed_rank_fails_the_other_then_resume_equals_uninterrupted(harvested, runs):
    code, err, detected = runs["killed"]
    print(f"rank 0 failed {detected:.2f} s after rank 1 was killed")
    assert code == 1, err[-2000:]
    assert "rank 0 of 2: a collective failed" in err and "--resume" in err, err[-2000:]
    assert detected < TIMEOUT_S + 5
    out, clean = runs["root"] / "killed", runs["root"] / "clean"
    step = json.loads((out / "training.json").read_text())["step"]
    assert 30 <= step < CFG["steps"]
    finish_ranks(launch_ranks(_argv(harvested, out, "--resume")), timeout=120)
    resumed, uninterrupted = _weights(out), _weights(clean)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # bit for bit
    a, b = (files.read_regular(f / "state.safetensors", 1 << 24) for f in (out, clean))
    assert a == b  # Adam's moments and the dead-feature counters too


@pytest.mark.slow
def test_a_silent_rank_fails_the_other_within_the_timeout(runs):
    """A rank that stops answering (SIGSTOP) fails the other after --dist-timeout seconds,
    not never: gloo's timeout on DDP's all-reduce."""
    code, err, waited = runs["silent"]
    print(f"rank 0 failed {waited:.2f} s after rank 1 stopped (timeout {SILENT_TIMEOUT_S} s)")
    assert code == 1, err[-2000:]
    assert "rank 0 of 2: a collective failed" in err and "--resume" in err, err[-2000:]
    assert SILENT_TIMEOUT_S - 0.5 < waited < SILENT_TIMEOUT_S + 10


class Interrupted(Exception):
    pass


def test_resume_in_one_process_equals_uninterrupted(tmp_path):
    """Interrupted right after its checkpoint at step 10 (from the log callback) and
    resumed, each architecture ends bit for bit where the uninterrupted run does."""
    data = TensorStreams(torch.randn(500, 12, generator=torch.Generator().manual_seed(0)), 2)

    def stop(line: str) -> None:
        if "step 10 " in line:
            raise Interrupted(line)

    for arch in ("standard", "topk", "jumprelu"):
        cfg = TrainConfig(architecture=arch, d_sae=24, k=3, steps=30, batch_size=32, streams=2,
                          warmup=5, checkpoint_every=10, l1=0.05)  # fmt: skip
        clean = train(data, cfg, tmp_path / f"clean-{arch}", SITE, progress=False)
        with pytest.raises(Interrupted):
            train(data, cfg, tmp_path / f"cut-{arch}", SITE, progress=False, log=stop)
        assert json.loads((tmp_path / f"cut-{arch}" / "training.json").read_text())["step"] == 10
        again = train(data, cfg, tmp_path / f"cut-{arch}", SITE, progress=False, resume=True)
        for k in clean.cfg.shapes():
            assert torch.equal(getattr(clean, k), getattr(again, k)), (arch, k)
        assert not torch.equal(clean.W_dec, build(cfg, (12,), data.mean(), SITE).W_dec)


def test_jumprelu_pseudo_derivatives():
    z = torch.tensor([[0.1, 0.5, 0.5004, 0.7], [0.4996, 0.2, 0.9, 0.3]], requires_grad=True)
    theta = torch.tensor([0.2, 0.5, 0.5, 0.69], requires_grad=True)
    eps = 0.002
    out = _JumpReLU.apply(z, theta, eps)
    assert torch.equal(out.detach(), torch.where(z > theta, z, 0).detach())
    g = torch.arange(1.0, 9.0).view(2, 4)
    dz, dtheta = torch.autograd.grad(out, (z, theta), g)
    assert torch.equal(dz, (z > theta).float() * g)
    # d/dθ: -(θ/ε) K((z-θ)/ε) summed over rows, K the rectangle on (-1/2, 1/2)
    near = ((z - theta).abs() < eps / 2).float()
    assert torch.allclose(dtheta, (-(theta / eps) * near * g).sum(0).detach())
    assert dtheta[1] != 0 and dtheta[0] == 0
    step = _Step.apply(z, theta, eps)
    dz, dtheta = torch.autograd.grad(step.sum(), (z, theta))
    assert torch.equal(step.detach(), (z > theta).float()) and torch.equal(dz, torch.zeros_like(z))
    assert torch.allclose(dtheta, (-(1 / eps) * near).sum(0))


def test_streams_cover_the_harvest_and_restart_anywhere(harvested):
    shards = [s[SITE] for s in H.iter_shards(harvested) if len(s[SITE])]
    every = torch.cat(shards)
    data = HarvestStreams(harvested, [SITE], 2, seed=1, buffer_shards=2)
    rows = sum(s["rows"] for s in data.parts[0])
    (first,) = next(data.batches(range(1), rows, 0))  # one epoch of stream 0
    mine = torch.cat(shards[0::2])  # shards 0, 2, 4, ... are stream 0's
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(first) == key(mine) and not torch.equal(first, mine)  # every row once, shuffled
    assert len(every) == data.tokens
    ten = data.batches(range(2), 7, 0)
    seq = [next(ten)[0] for _ in range(10)]
    later = next(data.batches(range(2), 7, 6))[0]
    assert torch.equal(later, seq[6])  # step 6 without reading steps 0-5
    (x, y) = next(HarvestStreams(harvested, [TC_IN, TC_OUT], 2).batches(range(2), 5, 0))
    assert x.shape == y.shape and len(x) == 10


def test_transcoder_trains_and_loads(harvested, tmp_path):
    data = HarvestStreams(harvested, [TC_IN, TC_OUT], 2)
    cfg = TrainConfig(architecture="standard", d_sae=32, steps=40, batch_size=32, streams=2,
                      warmup=5, l1=0.01)  # fmt: skip
    tc = train(data, cfg, tmp_path / "tc", TC_IN, TC_OUT, skip=True, progress=False)
    (loaded,) = resid.sae.load_transcoders(tmp_path / "tc" / "sae")
    for k in tc.cfg.shapes():
        assert torch.equal(getattr(tc, k), getattr(loaded, k)), k
    (x, y) = next(data.batches(range(2), 200, 0))
    before = (y - y.mean(0)).pow(2).sum()
    assert (loaded(x) - y).pow(2).sum() < 0.9 * before  # it learnt something of the MLP


def test_checkpoints_are_owned_and_checked(tmp_path):
    data = TensorStreams(torch.randn(200, 8, generator=torch.Generator().manual_seed(1)), 1)
    cfg = TrainConfig(d_sae=16, k=2, steps=5, batch_size=8, warmup=1)
    out = tmp_path / "run"
    train(data, cfg, out, SITE, progress=False)
    with pytest.raises(TrainingError, match="already exists: pass --resume"):
        train(data, cfg, out, SITE, progress=False)
    with pytest.raises(TrainingError, match=r"lr: 0.002 -> 0.01"):
        train(data, TrainConfig(**{**cfg.to_dict(), "lr": 0.01}), out, SITE, progress=False,
              resume=True)  # fmt: skip
    with pytest.raises(TrainingError, match="rows"):
        train(TensorStreams(torch.randn(100, 8), 1), cfg, out, SITE, progress=False, resume=True)
    more = TrainConfig(**{**cfg.to_dict(), "steps": 8})  # --steps may grow
    train(data, more, out, SITE, progress=False, resume=True)
    assert json.loads((out / "training.json").read_text())["step"] == 8
    (out / "state.safetensors").write_bytes(b"\x08" + bytes(20))
    with pytest.raises(TrainingError, match=r"state.safetensors"):
        train(data, more, out, SITE, progress=False, resume=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(TrainingError, match="already exists"):
        train(data, cfg, foreign, SITE, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(TrainingError, match="no training checkpoint"):
        train(data, cfg, foreign, SITE, progress=False, resume=True)
    with pytest.raises(TrainingError, match="3 ranks"):
        train(TensorStreams(torch.randn(200, 8), 2), TrainConfig(**{**cfg.to_dict(), "streams": 2}),
              tmp_path / "x", SITE, progress=False, world=3)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of streams"):
        TrainConfig(batch_size=10, streams=3)
    with pytest.raises(ValueError, match="unknown architecture"):
        TrainConfig(architecture="gated")


def test_objective_loss_is_the_global_mean(tmp_path):
    """The loss a rank backpropagates is its rows' summed loss × world / global batch: two
    half-batches' gradients, averaged as DDP averages them, are the whole batch's."""
    cfg = TrainConfig(architecture="standard", d_sae=16, l1=0.1, batch_size=8)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    sae = build(cfg, (6,), (x.mean(0),), SITE)
    obj = Objective(sae, cfg)
    whole = torch.autograd.grad(obj(x, x, 1 / 8, 0.1)[0], sae.W_enc)[0]
    halves = [torch.autograd.grad(obj(h, h, 2 / 8, 0.1)[0], sae.W_enc)[0] for h in x.split(4)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-6, atol=1e-7)
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    mse = (acts @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    by_hand = mse + 0.1 * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(obj(x, x, 1 / 8, 0.1)[0], by_hand)


def test_torchrun_passes_every_option_to_the_script():
    """torchrun parses the whole command line with argparse, which takes an abbreviation of
    its own options (``--log`` for ``--log-dir``) even after the script: none of
    train_sae.py's options may be one."""
    from torch.distributed.run import parse_args

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_sae
    finally:
        sys.path.remove(str(SCRIPT.parent))
    p = train_sae.argparse.ArgumentParser()
    train_sae.add_distributed(p)
    script_options = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
    script_options += ["--model", "--site", "--arch", "--d-sae", "--k", "--l1", "--steps",
                       "--out", "--seed", "--transcoders", "--skip"]  # fmt: skip
    assert len(script_options) > 25
    for option in script_options:
        argv = ["--nproc-per-node", "2", str(SCRIPT), option, "1"]
        assert parse_args(argv).training_script_args == [option, "1"], option
