"""Dataset sweeps (resid.interventions.dataset, resid.sae.dataset): the result against a plain
loop of per-item sweeps written here, two gloo ranks (real processes, torchrun's
environment) against one, a rank killed mid-run (the other fails within the timeout,
naming the folder) and the run resumed from the folder against the uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import finish_ranks, launch_ranks

from resid.interventions import dataset as D
from resid.interventions import metrics
from resid.interventions.dataset_store import DatasetError
from resid.interventions.patching import attribution_patch, sweep
from resid.sae.circuits import attribute_features

TIMEOUT_S = 10  # the process group's timeout in these runs

# what every process builds: the same tiny model, SAE and dataset from fixed seeds; the
# worker (a rank of a torchrun-like launch) runs the three dataset jobs and saves them
WORKER = r"""
import sys, time
import torch
import resid
from resid.core.config import Config
from resid.interventions import dataset as D, metrics
from resid.sae import SAE, SAEConfig
from resid.sae.dataset import attribute_features_dataset

SITE = "blocks.1.hook_resid_pre"


def build():
    torch.manual_seed(0)
    model = resid.Model(Config(n_layers=3, n_heads=4, d_model=32, d_head=8, d_mlp=64,
                               d_vocab=50, n_ctx=16)).eval()
    sae = SAE(SAEConfig(d_in=32, d_sae=48, hook_name=SITE, architecture="standard"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, sae


def items(n=14):
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        b = 1 + i % 3                     # items of 1, 2 and 3 prompts
        clean = torch.randint(0, 50, (b, 7), generator=g)
        corrupted = clean.clone()
        corrupted[:, 2] = torch.randint(0, 50, (b,), generator=g)
        a, w = torch.randint(0, 50, (2, b), generator=g)
        out.append((clean, corrupted, metrics.logit_diff(a, w, pos=-1)))
    return out


def slow(fn, delay):
    def one(*args):
        time.sleep(delay)
        return fn(*args)
    return one


if __name__ == "__main__":
    from resid.core.distributed import init_distributed
    torch.set_num_threads(1)
    out, mode = sys.argv[1], sys.argv[2]
    rank, world, _ = init_distributed("cpu", timeout_s=float(sys.argv[3]))
    model, sae = build()
    data = items()
    if mode == "all":
        results = {"sweep": D.sweep_dataset(model, data, site="resid_pre", progress=False,
                                            chunk_items=4, out=out + "/sweep"),
                   "attr": D.attribution_dataset(model, data, site="z", progress=False)}
        with model.saes([sae]):
            results["features"] = attribute_features_dataset(model, data, None, [sae],
                                                             progress=False)
    else:  # slow: long enough for a kill to land mid-run
        one = lambda m, c, k, f, a: D.sweep(m, c, k, f, "resid_pre", attention_mask=a,
                                             progress=False)
        results = {"sweep": D.run_dataset(model, data, slow(one, 0.3), job={"kind": "sweep",
                   "site": "resid_pre", "by_pos": True}, chunk_items=2, out=out + "/sweep",
                   progress=False)}
    if rank == 0:
        torch.save({k: (r.per_item.values, r.mean.values, r.baselines, r.rows)
                    for k, r in results.items()}, out + "/result.pt")
    torch.distributed.destroy_process_group() if world > 1 else None
"""
NS: dict = {}
exec(compile(WORKER.replace('if __name__ == "__main__":', "if False:"), "worker", "exec"), NS)


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield NS["build"]() + (NS["items"](),)
    torch.set_num_threads(threads)


def _launch(tmp: Path, mode: str, world: int = 2) -> list[subprocess.Popen]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    return launch_ranks([sys.executable, str(script), str(tmp), mode, str(TIMEOUT_S)], world)


def _plain(model, data, fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: one call per item, stacked, and the mean over prompts by hand."""
    per = torch.stack([fn(model, cor, cl, m).values for cl, cor, m in data])
    rows = torch.tensor([len(cor) for _, cor, _ in data], dtype=torch.float64)
    mean = sum(r * v.double() for r, v in zip(rows, per, strict=True)) / rows.sum()
    return per, mean.float(), rows


def test_dataset_result_is_the_per_item_results_and_their_mean(setup, tmp_path):
    model, sae, data = setup
    got = D.sweep_dataset(model, data, site="resid_pre", chunk_items=4, progress=False)
    per, mean, rows = _plain(model, data, lambda m, c, k, f: sweep(m, c, k, f, progress=False))
    assert got.per_item.axes == ("item", "layer", "pos") and len(got) == len(data)
    assert torch.equal(got.per_item.values, per)
    torch.testing.assert_close(got.mean.values, mean, rtol=1e-6, atol=1e-7)
    assert torch.equal(got.rows, rows.long())
    # one prompt per item: the items' values are the per-prompt sweeps
    single = data[0::3]  # items 0, 3, 6, … hold one prompt each
    got = D.attribution_dataset(model, single, site="z", progress=False)
    per, _, _ = _plain(model, single, lambda m, c, k, f: attribution_patch(m, c, k, f, "z"))
    assert torch.equal(got.per_item.values, per)
    with model.saes([sae]):
        got = NS["attribute_features_dataset"](model, data, None, [sae], progress=False)
        per, mean, _ = _plain(model, data, lambda m, c, k, f: attribute_features(m, c, k, f, [sae]))
    assert got.mean.labels_of("feature")[:2] == ["F0", "F1"]
    assert torch.equal(got.per_item.values, per)
    torch.testing.assert_close(got.mean.values, mean, rtol=1e-6, atol=1e-7)


def test_two_ranks_equal_one(setup, tmp_path):
    model, sae, data = setup
    procs = _launch(tmp_path, "all")
    one = {"sweep": D.sweep_dataset(model, data, site="resid_pre", progress=False, chunk_items=4),
           "attr": D.attribution_dataset(model, data, site="z", progress=False)}  # fmt: skip
    with model.saes([sae]):
        one["features"] = NS["attribute_features_dataset"](model, data, None, [sae], progress=False)
    finish_ranks(procs, timeout=90)
    two = torch.load(tmp_path / "result.pt")
    worst = 0.0
    for key, r in one.items():
        per, mean, baselines, rows = two[key]
        assert torch.equal(rows, r.rows)  # integers: exact
        for a, b in ((per, r.per_item.values), (mean, r.mean.values), (baselines, r.baselines)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            worst = max(worst, float(((a - b).abs() / b.abs().clamp(min=1e-30)).max()))
    print(f"2 ranks vs 1: max relative |Δ| {worst:.1e}")
    # the folder rank 0 wrote reads back as the same result
    back = D.sweep_dataset(model, data, site="resid_pre", chunk_items=4, progress=False,
                           out=tmp_path / "sweep", resume=True)  # fmt: skip
    assert torch.equal(back.per_item.values, one["sweep"].per_item.values)


def test_killed_rank_fails_the_other_then_resume_equals_uninterrupted(setup, tmp_path):
    model, _, data = setup
    procs = _launch(tmp_path, "slow")
    manifest = tmp_path / "sweep" / "resid-manifest.json"
    try:
        deadline = time.monotonic() + 60
        while not manifest.exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.05)
        assert manifest.exists(), "no chunk was written"
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
        detected = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
    print(f"rank 0 failed {detected:.2f} s after rank 1 was killed")
    assert procs[0].returncode != 0 and detected < TIMEOUT_S + 5
    assert "DistributedError" in err and "resume=True" in err and "rank 0 of 2" in err, err[-2000:]
    written = D.Store(tmp_path / "sweep", {"kind": "sweep", "site": "resid_pre", "by_pos": True,
                                          "chunk_items": 2}, resume=True).done  # fmt: skip
    assert 1 <= written < len(data) // 2, written
    with pytest.raises(DatasetError, match="resume=True"):
        D.sweep_dataset(model, data, chunk_items=2, out=tmp_path / "sweep", progress=False)
    other = [(cl, cl, m) for cl, _, m in data]  # other data: refused, not mixed in
    with pytest.raises(DatasetError, match="other data"):
        D.sweep_dataset(model, other, chunk_items=2, out=tmp_path / "sweep", resume=True,
                        progress=False)  # fmt: skip
    resumed = D.sweep_dataset(model, data, chunk_items=2, out=tmp_path / "sweep", resume=True,
                              progress=False)  # fmt: skip
    clean = D.sweep_dataset(model, data, chunk_items=2, out=tmp_path / "clean", progress=False)
    assert torch.equal(resumed.per_item.values, clean.per_item.values)
    assert torch.equal(resumed.mean.values, clean.mean.values)
    print(
        f"resumed vs uninterrupted: max |Δ| {(resumed.mean.values - clean.mean.values).abs().max():.1e}"
    )


def test_texts_are_tokenized_as_to_tokens_does(tiny):
    clean = ["When Mary and John went out, John gave it to", "Then Bob and Al met; Al saw"]
    corrupted = ["When Mary and John went out, Mary gave it to", "Then Bob and Al met; Bob saw"]
    metric = metrics.logit_diff(torch.tensor([5, 6]), torch.tensor([7, 8]), pos=-1)
    got = D.attribution_dataset(tiny, [(clean, corrupted, metric)], progress=False)
    cor, mask = tiny.to_tokens(corrupted, return_attention_mask=True)
    assert not mask.all()  # padded: the mask is passed on
    ref = attribution_patch(tiny, cor, tiny.to_tokens(clean), metric, attention_mask=mask)
    assert torch.equal(got.per_item.values[0], ref.values)


def test_bad_items_and_folders_are_named(setup, tmp_path):
    model, _, data = setup
    with pytest.raises(DatasetError, match="item 1 is a str"):
        D.sweep_dataset(model, [data[0], "text"], progress=False)
    with pytest.raises(DatasetError, match="no metric"):
        D.sweep_dataset(model, [data[0][:2]], progress=False)
    with pytest.raises(DatasetError, match="same length"):
        long = (torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long), data[0][2])
        D.sweep_dataset(model, [data[0], long], progress=False)
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        D.sweep_dataset(model, data[:2], out=tmp_path, progress=False)
    with pytest.raises(DatasetError, match="not a dataset sweep"):
        D.sweep_dataset(model, data[:2], out=tmp_path, resume=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
