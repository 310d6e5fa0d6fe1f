"""Training on activations computed on the fly (resid.sae.model_streams.ModelStreams)
against a plain reference written here: the rows of one ``model.run_with_cache`` over all
the tokens (padding dropped), dealt, ordered and shuffled by the law the module documents
(sequences ``s, s + n, …`` to stream ``s``; per epoch a permutation seeded by
``(seed, stream, epoch)``; each buffer's rows permuted by ``(seed, stream, epoch,
buffer + 1)``), and fed to ``train`` from a list. Then: training on both bit for bit, a
resumed run against an uninterrupted one, the clear errors, the user's objects untouched,
and scripts/train_sae.py --tokens / --text (and 2 torchrun ranks against 1)."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import finish_ranks, launch_ranks

import resid
from resid.sae.model_streams import ModelStreams
from resid.sae.training import TrainConfig, TrainingError, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_sae.py"
SITE = "blocks.1.hook_resid_post"
TC_IN, TC_OUT = "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"
N, POS = 30, 12


@pytest.fixture(scope="module")
def model() -> resid.Model:
    torch.manual_seed(0)
    cfg = resid.Config(n_layers=3, n_heads=4, d_model=32, d_head=8, d_mlp=64, n_ctx=32)
    return resid.Model(cfg)  # GPT-2's vocabulary: its tokenizer, offline


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [30, 12] and a right-padding mask (3 to 12 real tokens a row)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50257, (N, POS), generator=g)
    lengths = torch.randint(3, POS + 1, (N,), generator=g)
    lengths[0] = POS
    mask = torch.arange(POS)[None, :] < lengths[:, None]
    return tokens, mask


def plain(model, tokens, mask, sites) -> list[torch.Tensor]:
    """Each sequence's rows (every site's activations side by side, heads flattened) from
    one plain run_with_cache over all the tokens, padding dropped."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=list(sites), attention_mask=mask)
    acts = torch.cat([cache[s].reshape(*tokens.shape, -1).float() for s in sites], -1)
    m = mask if mask is not None else torch.ones(tokens.shape, dtype=torch.bool)
    return [acts[i][m[i]] for i in range(len(tokens))]


def seeded(*key: int) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def reference_batches(per_seq, streams, seed, buffer, rows, steps, widths) -> list[tuple]:
    """The global batches of ``steps`` steps, by the documented law, from ``per_seq``."""

    def stream(s):
        mine = torch.arange(s, len(per_seq), streams)
        epoch = 0
        while True:
            order = mine[torch.randperm(len(mine), generator=seeded(seed, s, epoch))]
            for b, at in enumerate(range(0, len(order), buffer)):
                x = torch.cat([per_seq[i] for i in order[at : at + buffer].tolist()])
                yield from x[torch.randperm(len(x), generator=seeded(seed, s, epoch, b + 1))]
            epoch += 1

    its = [stream(s) for s in range(streams)]
    out = []
    for _ in range(steps):
        joined = torch.stack([next(it) for it in its for _ in range(rows)])
        out.append(tuple(joined.split(list(widths), -1)))
    return out


class Listed:
    """A training source that yields precomputed batches (the plain reference)."""

    def __init__(self, batches, mean, streams, widths):
        self.batches_, self.mean_, self.streams, self.widths = batches, mean, streams, widths

    def batches(self, streams, rows, start):
        assert streams == range(self.streams) and start == 0
        yield from self.batches_

    def mean(self):
        return self.mean_

    def identity(self):
        return {"listed": len(self.batches_)}


def sorted_rows(t: torch.Tensor) -> list:
    return sorted(map(tuple, t.tolist()))


@pytest.mark.parametrize(
    "sites",
    [(SITE,), (TC_IN, TC_OUT), ("blocks.0.attn.hook_z",), ("hook_embed",),
     ("ln_final.hook_normalized",)],
)  # fmt: skip
def test_an_epoch_is_the_plain_cache_in_the_documented_order(model, data, sites):
    tokens, mask = data
    per_seq = plain(model, tokens, mask, sites)
    ms = ModelStreams(model, tokens, sites, streams=2, seed=4, attention_mask=mask,
                      batch_sequences=3, buffer_sequences=4)  # fmt: skip
    widths = ms.widths
    assert sum(widths) == per_seq[0].shape[-1]
    for s in range(2):
        n = sum(len(per_seq[i]) for i in range(s, N, 2))
        got = torch.cat(next(ms.batches(range(s, s + 1), n, 0)), -1)  # stream s, one epoch
        mine = torch.cat(per_seq[s::2])
        assert sorted_rows(got) == sorted_rows(mine)  # every row once, bit for bit
        assert not torch.equal(got, mine)  # shuffled
    ref = reference_batches(per_seq, 2, 4, 4, 7, 40, widths)  # 40 steps: several epochs
    it = ms.batches(range(2), 7, 0)
    for step in range(40):
        got = next(it)
        assert all(g.dtype == torch.float32 for g in got)
        assert all(torch.equal(g, r) for g, r in zip(got, ref[step], strict=True)), step
    assert not model.has_hooks()


def test_stop_at_layer_from_the_site_table(model, data):
    tokens, _ = data
    for sites, stop in (((SITE,), 2), ((TC_IN, TC_OUT), 3), (("hook_embed",), 0),
                        (("blocks.0.hook_resid_pre", "ln_final.hook_normalized"), None)):  # fmt: skip
        assert ModelStreams(model, tokens, sites).stop == stop


def test_token_dtypes_give_the_same_rows(model, data):
    tokens, mask = data
    want = ModelStreams(model, tokens, SITE, attention_mask=mask).rows(torch.arange(N))
    for dtype in (torch.int32, torch.uint16):  # uint16: token files often are
        ms = ModelStreams(model, tokens.to(dtype), SITE, attention_mask=mask.to(torch.uint8))
        assert torch.equal(ms.rows(torch.arange(N))[0], want[0])
        assert ms.identity() == ModelStreams(model, tokens, SITE, attention_mask=mask).identity()


def test_a_bfloat16_model_gives_float32_rows(model, data):
    tokens, mask = data
    half = copy.deepcopy(model).to(torch.bfloat16)
    ms = ModelStreams(half, tokens, SITE, attention_mask=mask)
    (got,) = ms.rows(torch.arange(N))
    with torch.no_grad():
        _, cache = half.run_with_cache(tokens, names_filter=[SITE], attention_mask=mask)
    assert cache[SITE].dtype == torch.bfloat16 and got.dtype == torch.float32
    assert torch.equal(got, cache[SITE][mask].float())
    assert ms.identity() != ModelStreams(model, tokens, SITE, attention_mask=mask).identity()


def test_left_padding_drops_the_padded_positions(model, data):
    tokens, right = data
    left = right.flip(1)
    per_seq = plain(model, tokens, left, (SITE,))
    ms = ModelStreams(model, tokens, SITE, attention_mask=left.long(), buffer_sequences=64)
    (got,) = next(ms.batches(range(1), int(left.sum()), 0))
    assert sorted_rows(got) == sorted_rows(torch.cat(per_seq))


def test_training_equals_training_on_the_plain_rows(model, data, tmp_path):
    tokens, mask = data
    for arch, sites in (("topk", (SITE,)), ("standard", (TC_IN, TC_OUT))):
        cfg = TrainConfig(architecture=arch, d_sae=48, k=4, steps=25, batch_size=16, streams=2,
                          seed=2, warmup=5, l1=0.01, checkpoint_every=100)  # fmt: skip
        ms = ModelStreams(model, tokens, sites, 2, seed=2, attention_mask=mask,
                          buffer_sequences=5, mean_sequences=7)  # fmt: skip
        per_seq = plain(model, tokens, mask, sites)
        first = torch.cat(per_seq[:7]).double().mean(0).float()
        mean = tuple(first.split(list(ms.widths)))
        listed = Listed(reference_batches(per_seq, 2, 2, 5, 8, 25, ms.widths), mean, 2, ms.widths)
        out = sites[1] if len(sites) == 2 else None
        a = train(ms, cfg, tmp_path / f"fly-{arch}", sites[0], out, progress=False)
        b = train(listed, cfg, tmp_path / f"ref-{arch}", sites[0], out, progress=False)
        for k in a.cfg.shapes():
            assert torch.equal(getattr(a, k), getattr(b, k)), (arch, k)
        assert all(torch.equal(x, y) for x, y in zip(ms.mean(), mean, strict=True))


class Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted_and_refuses_other_data(model, data, tmp_path):
    tokens, mask = data
    cfg = TrainConfig(architecture="jumprelu", d_sae=40, steps=30, batch_size=32, streams=2,
                      warmup=5, checkpoint_every=10, l1=0.01)  # fmt: skip

    def fly(t=tokens, sites=SITE):
        return ModelStreams(model, t, sites, 2, attention_mask=mask, buffer_sequences=4)

    def stop(line: str) -> None:
        if "step 10 " in line:
            raise Interrupted(line)

    clean = train(fly(), cfg, tmp_path / "clean", SITE, progress=False)
    with pytest.raises(Interrupted):
        train(fly(), cfg, tmp_path / "cut", SITE, progress=False, log=stop)
    assert json.loads((tmp_path / "cut" / "training.json").read_text())["step"] == 10
    again = train(fly(), cfg, tmp_path / "cut", SITE, progress=False, resume=True)
    for k in clean.cfg.shapes():
        assert torch.equal(getattr(clean, k), getattr(again, k)), k  # bit for bit
    other = tokens.clone()
    other[3, 2] += 1
    with pytest.raises(TrainingError, match="tokens_sha256"):
        train(fly(other), cfg, tmp_path / "cut", SITE, progress=False, resume=True)
    with pytest.raises(TrainingError, match="blocks.2.hook_resid_pre"):
        train(fly(sites="blocks.2.hook_resid_pre"), cfg, tmp_path / "cut",
              "blocks.2.hook_resid_pre", progress=False, resume=True)  # fmt: skip
    ms = fly()  # any step, without the steps before it (epochs of ~60 rows a stream)
    seq = [next(it) for it in [ms.batches(range(2), 9, 0)] for _ in range(25)]
    for start in (1, 6, 7, 13, 24):
        assert torch.equal(next(ms.batches(range(2), 9, start))[0], seq[start][0]), start


def test_bad_inputs_are_refused_clearly(model, data):
    tokens, mask = data
    with pytest.raises(ValueError, match=r"blocks.1.hook_resid_post"):
        ModelStreams(model, tokens, "blocks.1.hook_resid_pots")  # the closest names
    with pytest.raises(ValueError, match="not one vector per token"):
        ModelStreams(model, tokens, "blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match="two distinct"):
        ModelStreams(model, tokens, (SITE, SITE))
    with pytest.raises(ValueError, match="two distinct"):
        ModelStreams(model, tokens, (SITE, TC_IN, TC_OUT))
    with pytest.raises(TypeError, match="integers"):
        ModelStreams(model, tokens.float(), SITE)
    with pytest.raises(ValueError, match=r"\[n_sequences, pos\]"):
        ModelStreams(model, tokens[0], SITE)
    with pytest.raises(TypeError, match="from_numpy"):
        ModelStreams(model, tokens.numpy(), SITE)
    bad = tokens.clone()
    bad[2, 3] = 50257
    with pytest.raises(ValueError, match=r"\[50257\] are outside the model's vocabulary"):
        ModelStreams(model, bad, SITE)
    with pytest.raises(ValueError, match="context of 32"):
        ModelStreams(model, torch.zeros(2, 33, dtype=torch.long), SITE)
    for streams in (0, N + 1, 2.0):
        with pytest.raises(ValueError, match="streams must be an int"):
            ModelStreams(model, tokens, SITE, streams=streams)
    with pytest.raises(ValueError, match="shape"):
        ModelStreams(model, tokens, SITE, attention_mask=mask[:, 1:])
    empty = mask.clone()
    empty[4] = False
    with pytest.raises(ValueError, match=r"sequences \[4\] are all padding"):
        ModelStreams(model, tokens, SITE, attention_mask=empty)
    with pytest.raises(ValueError, match="0/1"):
        ModelStreams(model, tokens, SITE, attention_mask=mask.long() * 2)
    with pytest.raises(ValueError, match="buffer_sequences must be an int in \\[1, 1048576\\]"):
        ModelStreams(model, tokens, SITE, buffer_sequences=1 << 21)
    wide = resid.Model(resid.Config(n_layers=1, n_heads=32, d_model=2048, d_head=64, d_mlp=8,
                                    d_vocab=10, n_ctx=2048))  # fmt: skip
    long = torch.zeros(1, 2048, dtype=torch.long)  # 2^22 floats a sequence: 512 in 2^31
    with pytest.raises(ValueError, match=r"2\^31 floats in memory: pass buffer_sequences=512"):
        ModelStreams(wide, long, "blocks.0.hook_resid_pre", buffer_sequences=513)
    with pytest.raises(ValueError, match="buffer_sequences must be an int in \\[1,"):
        ModelStreams(model, tokens, SITE, buffer_sequences=0)
    with pytest.raises(ValueError, match="not a device"):
        ModelStreams(model, tokens, SITE, device="gpu:x")
    with pytest.raises(TypeError, match="hook name"):
        ModelStreams(model, tokens, 3)
    with pytest.raises(TypeError, match="resid.Model"):
        ModelStreams(object(), tokens, SITE)
    ms = ModelStreams(model, tokens, SITE, streams=2)
    with pytest.raises(ValueError, match="within range\\(2\\)"):
        next(ms.batches(range(1, 3), 4, 0))
    with pytest.raises(ValueError, match="rows must be"):
        next(ms.batches(range(2), 0, 0))


def test_the_users_objects_are_untouched_and_no_hook_stays(model, data):
    tokens, mask = data
    t0, m0 = tokens.clone(), mask.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ms = ModelStreams(model, tokens, (TC_IN, TC_OUT), 2, attention_mask=mask)
    before = next(ms.batches(range(2), 50, 3))
    ms.mean()
    assert torch.equal(tokens, t0) and torch.equal(mask, m0)
    mine, my_mask = tokens.clone(), mask.clone()
    copied = ModelStreams(model, mine, (TC_IN, TC_OUT), 2, attention_mask=my_mask)
    mine.fill_(7), my_mask.fill_(True)  # the streams hold copies: later changes are not seen
    after = next(copied.batches(range(2), 50, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not model.has_hooks()

    def boom(act, hook):
        raise RuntimeError("the user's hook failed")

    with model.hooks([("blocks.0.hook_resid_post", boom)]):
        with pytest.raises(RuntimeError, match="user's hook"):
            next(ms.batches(range(2), 8, 0))
        assert [h[0] for h in model.list_hooks()] == ["blocks.0.hook_resid_post"]
    assert not model.has_hooks()


# -- scripts/train_sae.py: --tokens and --text, one process and two torchrun ranks --


@pytest.fixture(scope="module")
def saved(model, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fly")
    path = resid.save(model, folder / "model")
    tokens, mask = data
    torch.save({"tokens": tokens, "attention_mask": mask}, folder / "tokens.pt")
    np.save(folder / "tokens.npy", tokens.numpy().astype(np.uint16))  # as token files often are
    return folder, path


ARGS = ["--site", SITE, "--arch", "topk", "--d-sae", "32", "--k", "4", "--steps", "16",
        "--batch-size", "16", "--streams", "2", "--seed", "5", "--warmup", "4",
        "--buffer-sequences", "8", "--quiet"]  # fmt: skip
CFG = TrainConfig(architecture="topk", d_sae=32, k=4, steps=16, batch_size=16, streams=2,
                  seed=5, warmup=4)  # fmt: skip


def run_script(argv, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_sae
    finally:
        sys.path.remove(str(SCRIPT.parent))
    monkeypatch.setattr(sys, "argv", ["train_sae.py", *argv])
    with pytest.raises(SystemExit) as done:
        train_sae.main()
    return done.value.code


def weights(folder: Path) -> dict[str, torch.Tensor]:
    sae = resid.sae.load(folder / "sae")
    return {k: getattr(sae, k).detach() for k in sae.cfg.shapes()}


def test_script_trains_on_tokens_and_text(model, data, saved, tmp_path, monkeypatch):
    folder, path = saved
    tokens, mask = data
    code = run_script(["--model", str(path), "--tokens", str(folder / "tokens.pt"), *ARGS,
                       "--out", str(tmp_path / "pt")], monkeypatch)  # fmt: skip
    assert code == 0
    ms = ModelStreams(model, tokens, SITE, 2, 5, attention_mask=mask, buffer_sequences=8)
    direct = train(ms, CFG, tmp_path / "direct", SITE, progress=False)
    got = weights(tmp_path / "pt")
    assert all(torch.equal(getattr(direct, k), got[k]) for k in got)
    assert run_script(["--model", str(path), "--tokens", str(folder / "tokens.npy"), *ARGS,
                       "--out", str(tmp_path / "npy")], monkeypatch) == 0  # fmt: skip
    unmasked = ModelStreams(model, tokens, SITE, 2, 5, buffer_sequences=8)
    direct = train(unmasked, CFG, tmp_path / "direct-npy", SITE, progress=False)
    got = weights(tmp_path / "npy")
    assert all(torch.equal(getattr(direct, k), got[k]) for k in got)
    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat and the dog ran to the owl. " * 40)
    assert run_script(["--model", str(path), "--text", str(text), "--context-length", "8",
                       *ARGS, "--out", str(tmp_path / "text")], monkeypatch) == 0  # fmt: skip
    record = json.loads((tmp_path / "text" / "training.json").read_text())
    ids = model.tokenizer.encode(text.read_text())
    n = len(ids) // 7  # BOS and 7 tokens of the text a sequence
    assert record["data"]["sequences"] == n and record["data"]["positions"] == 8
    bad = tmp_path / "bad.pt"
    torch.save(tokens.float(), bad)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x93NUMPY not really")
    for wrong in (["--tokens", str(bad)], ["--tokens", str(text)], ["--tokens", str(junk)],
                  ["--tokens", str(folder / "tokens.pt"), "--text", str(text)]):  # fmt: skip
        assert run_script(["--model", str(path), *wrong, *ARGS, "--out",
                           str(tmp_path / "bad")], monkeypatch) == 1  # fmt: skip
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one(model, data, saved, tmp_path):
    folder, path = saved
    tokens, mask = data
    argv = [sys.executable, str(SCRIPT), "--model", str(path), "--tokens",
            str(folder / "tokens.pt"), *ARGS, "--out", str(tmp_path / "two"),
            "--dist-timeout", "60"]  # fmt: skip
    finish_ranks(launch_ranks(argv), timeout=180)
    ms = ModelStreams(model, tokens, SITE, 2, 5, attention_mask=mask, buffer_sequences=8)
    one = train(ms, CFG, tmp_path / "one", SITE, progress=False)
    two = weights(tmp_path / "two")
    worst = max((getattr(one, k) - two[k]).abs().max().item() for k in two)
    print(f"max |2 ranks - 1 rank| = {worst:.3g}")
    assert worst <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_rows_come_out_where_asked(model, data):
    tokens, mask = data  # one forward of all N, as the reference (GEMMs may differ by batch)
    gpu = copy.deepcopy(model).to("cuda")
    with torch.no_grad():
        _, cache = gpu.run_with_cache(tokens.cuda(), names_filter=[SITE], attention_mask=mask)
    want = cache[SITE][mask.cuda()].float()
    (x,) = ModelStreams(gpu, tokens, SITE, attention_mask=mask, batch_sequences=N).rows(
        torch.arange(N)
    )
    (y,) = ModelStreams(
        gpu, tokens, SITE, attention_mask=mask, batch_sequences=N, device="cpu"
    ).rows(torch.arange(N))
    assert x.device.type == "cuda" and y.device.type == "cpu"
    assert torch.equal(x, want) and torch.equal(y, want.cpu())
