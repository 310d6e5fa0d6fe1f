"""Parity with transformers on a CUDA device, fp32 and bf16. Skipped where there is no GPU."""

import copy

import pytest
import torch
from conftest import hf_with

import resid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine"),
]


def _global_precision() -> tuple:
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )


@pytest.fixture(autouse=True)
def global_precision_is_restored():
    """No test here may leave the process-wide TF32 switches changed for the tests after it."""
    before = _global_precision()
    yield
    assert _global_precision() == before, "a GPU test changed the global TF32 settings"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp32_on_gpu_matches_transformers(small_hf, small_dir, attn, monkeypatch):
    tokens = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()
    model = resid.load(small_dir, device="cuda")
    hf = hf_with(copy.deepcopy(small_hf), attn).cuda()  # the fixture stays on the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # undone afterwards
    with torch.no_grad():
        ref, ours = hf(tokens).logits, model(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_bf16_on_gpu_matches_transformers(small_hf, small_dir):
    tokens = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(1)).cuda()
    model = resid.load(small_dir, device="cuda", dtype=torch.bfloat16)
    hf = hf_with(copy.deepcopy(small_hf), "sdpa").cuda()
    with torch.no_grad():
        exact = hf(tokens).logits.float()  # fp32 truth, before the weights are rounded
        hf.to(torch.bfloat16)
        ref, ours = hf(tokens).logits.float(), model(tokens).float()
    top1 = (ours.argmax(-1) == exact.argmax(-1)).float().mean().item()
    ref_top1 = (ref.argmax(-1) == exact.argmax(-1)).float().mean().item()
    # resid in bf16 is as close to the fp32 truth as transformers in bf16 is
    assert top1 >= min(0.99, ref_top1 - 0.01)
    assert (ours - exact).abs().max() <= 1.5 * (ref - exact).abs().max() + 1e-2


def test_run_with_cache_to_cpu_from_gpu(small_dir):
    model = resid.load(small_dir, device="cuda")
    tokens = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n, device="cpu")
    assert all(t.device.type == "cpu" for t in cache.values())
    assert len(cache) == 3 * model.cfg.n_layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_observing_never_changes_the_output_on_gpu(small_dir, dtype):
    model = resid.load(small_dir, device="cuda", dtype=dtype)
    tokens = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        plain = model(tokens)
        for names in (None, lambda n: n.endswith("hook_pattern"), lambda n: "scale" in n):
            cached, _ = model.run_with_cache(tokens, names_filter=names)
            assert torch.equal(cached, plain)


def test_sweep_chunk_size_never_changes_a_value_on_gpu(small_dir):
    from resid import metrics
    from resid.interventions.patching import sweep

    model = resid.load(small_dir, device="cuda")
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(0, 50257, (2, 8), generator=g).cuda()
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % 50257
    metric = metrics.logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]), pos=-1)
    runs = [
        sweep(model, corrupted, clean, metric, "resid_pre", chunk_cells=c, progress=False).values
        for c in (1, 5, None)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_kv_cached_generation_equals_full_recompute_on_gpu(small_dir):
    model = resid.load(small_dir, device="cuda")
    prompt = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(5)).cuda()
    cached = model.generate(prompt, max_new_tokens=16, temperature=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(16):  # the plain loop: the whole sequence every step
            nxt = model(tokens)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
    assert torch.equal(cached, tokens)
