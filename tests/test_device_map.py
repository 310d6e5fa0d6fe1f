"""device_map (resid.core.devices, Model.to_devices, resid.load(device_map=...)): the placement
itself against hand-computed plans and its laws, and the multi-device forward with every
"device" the CPU (each move a no-op, the code path the same) against the model on one device,
bit for bit: logits, caches, hooks, sweeps, attribution, KV-cached generation, SAE splices.
Two-GPU tests (and a CPU + GPU split) skip without the devices."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resid
from resid.core.devices import parse_device_map, plan_devices, resolve
from resid.interventions import metrics
from resid.interventions.patching import attribution_patch, sweep
from resid.sae import SAE, SAEConfig

CPU = torch.device("cpu")


def _devs(*names: str) -> list[torch.device]:
    return [torch.device(n) for n in names]


# ---- the placement ------------------------------------------------------------------------


def test_plans_by_hand():
    assert plan_devices(4, ["cuda:0", "cuda:1"]) == _devs(*["cuda:0"] * 2, *["cuda:1"] * 2)
    assert plan_devices(5, ["cuda:0", "cuda:1"]) == _devs(*["cuda:0"] * 3, *["cuda:1"] * 2)
    assert plan_devices(3, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]) == _devs(
        "cuda:0", "cuda:1", "cuda:2"
    )
    # by free memory: 1 GB and 3 GB share 4 blocks 1:3
    assert plan_devices(4, ["cuda:0", "cuda:1"], [1e9, 3e9]) == _devs("cuda:0", *["cuda:1"] * 3)
    # 8 GB and 2 GB, 2 GB blocks: 3.2 : 0.8 rounds to 3 : 1; capacity 4 and 1 allows it
    assert plan_devices(4, ["cuda:0", "cuda:1"], [8e9, 2e9], 2e9) == _devs(
        *["cuda:0"] * 3, "cuda:1"
    )
    # 1 GB and 9 GB, 3 GB blocks: proportion says 1 : 9 of 10, capacity 0 and 3
    assert plan_devices(3, ["cuda:0", "cuda:1"], [1e9, 9e9], 3e9) == _devs(*["cuda:1"] * 3)
    # proportion 2:2 but cuda:0 holds only 1 block: the other takes it
    assert plan_devices(4, ["cuda:0", "cuda:1"], [1e9, 1.001e9 * 3], 1e9) == _devs(
        "cuda:0", *["cuda:1"] * 3
    )


def test_bad_plans_are_named():
    with pytest.raises(ValueError, match="do not fit"):
        plan_devices(4, ["cuda:0", "cuda:1"], [1e9, 1e9], 1e9)
    with pytest.raises(ValueError, match="one finite number"):
        plan_devices(4, ["cuda:0"], [1e9, 1e9])
    with pytest.raises(ValueError, match="at least one device"):
        plan_devices(4, [])
    with pytest.raises(ValueError, match="positive int"):
        plan_devices(0, ["cpu"])


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 80),
    free=st.lists(st.integers(0, 10**12), min_size=1, max_size=8),
    layer=st.integers(1, 10**11),
)
def test_plan_laws(n, free, layer):
    """Every block placed once, consecutive blocks per device in the order given, none past
    its device's free memory; without memory, counts differ by at most one."""
    devices = [f"cuda:{i}" for i in range(len(free))]
    fits = sum(f // layer for f in free) >= n
    if sum(free) == 0 or not fits:
        with pytest.raises(ValueError):
            plan_devices(n, devices, free, layer)
    else:
        plan = plan_devices(n, devices, free, layer)
        index = [d.index for d in plan]
        assert len(plan) == n and index == sorted(index)
        for i, f in enumerate(free):
            assert index.count(i) * layer <= f
    even = [d.index for d in plan_devices(n, devices)]
    counts = [even.count(i) for i in range(len(devices))]
    assert even == sorted(even) and max(counts) - min(counts) <= 1 and sum(counts) == n


def test_device_map_dicts():
    assert parse_device_map({"blocks.0-1": "cpu", "blocks.2": "cuda:0"}, 3) == _devs(
        "cpu", "cpu", "cuda:0"
    )
    with pytest.raises(ValueError, match="without a device"):
        parse_device_map({"blocks.0-1": "cpu"}, 3)
    with pytest.raises(ValueError, match="twice"):
        parse_device_map({"blocks.0-1": "cpu", "blocks.1-2": "cpu"}, 3)
    with pytest.raises(ValueError, match="blocks 0..2"):
        parse_device_map({"blocks.0-3": "cpu"}, 3)
    with pytest.raises(ValueError, match="blocks.A-B"):
        parse_device_map({"layers.0": "cpu"}, 3)
    with pytest.raises(ValueError, match="not both"):
        resolve("auto", 3, n_devices=1)
    if not torch.cuda.is_available():
        assert resolve("auto", 3) == [CPU] * 3


# ---- the multi-device forward, every device the CPU ---------------------------------------


@pytest.fixture(scope="module")
def split(tiny):
    model = copy.deepcopy(tiny).to_devices(["cpu", "cpu"])
    assert model.layer_devices == (CPU, CPU)
    return model


def test_a_placed_model_moved_to_one_device_is_a_one_device_model(split, tiny):
    """``model.to(device)`` after ``to_devices`` leaves no stale plan behind."""
    model = copy.deepcopy(split).to("cpu")
    assert model.layer_devices is None
    assert torch.equal(model(torch.arange(9)[None]), tiny(torch.arange(9)[None]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moving_a_model_on_two_devices_keeps_or_drops_its_plan(tiny):
    model = copy.deepcopy(tiny).to_devices(["cuda:0", "cpu"])
    assert model.layer_devices == (torch.device("cuda", 0), CPU)
    model.double()  # a dtype, not a device: still on both
    assert model.layer_devices == (torch.device("cuda", 0), CPU)
    model.to("cpu")
    assert model.layer_devices is None and {p.device for p in model.parameters()} == {CPU}


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (3, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, 50257, (3,), generator=g)
    return clean, corrupted


def test_forward_cache_and_hooks_are_bit_identical(tiny, split, prompts):
    clean, _ = prompts
    assert tiny.layer_devices is None  # the original model was copied, not placed
    ref = tiny(clean)
    assert torch.equal(split(clean), ref)
    logits, cache = split.run_with_cache(clean)
    assert torch.equal(logits, ref)  # observing never changes the result
    _, ref_cache = tiny.run_with_cache(clean)
    assert cache.keys() == ref_cache.keys()
    assert all(torch.equal(cache[k], ref_cache[k]) for k in cache)

    def ablate(act, hook):
        act[:, :, 1] = 0.0
        return act

    hooks = [("blocks.1.attn.hook_z", ablate)]
    assert torch.equal(
        split.run_with_hooks(clean, fwd_hooks=hooks), tiny.run_with_hooks(clean, fwd_hooks=hooks)
    )
    assert torch.equal(split(clean, return_type="loss"), tiny(clean, return_type="loss"))
    assert torch.equal(split.W_Q, tiny.W_Q) and split.W_Q.device == split.device


@pytest.mark.parametrize("site", ["resid_pre", "z", "mlp_out", "pattern"])
def test_sweeps_and_attribution_are_bit_identical(tiny, split, prompts, site):
    clean, corrupted = prompts
    metric = metrics.logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]), pos=-1)
    for fn in (
        lambda m: sweep(m, corrupted, clean, metric, site, progress=False),
        lambda m: attribution_patch(m, corrupted, clean, metric, site),
    ):
        a, b = fn(split), fn(tiny)
        assert torch.equal(a.values, b.values)


def test_kv_cached_generation_is_identical(tiny, split, prompts):
    clean, _ = prompts
    a = split.generate(clean, max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    b = tiny.generate(clean, max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    assert torch.equal(a, b)


def test_sae_splice_is_identical(tiny, split, prompts):
    clean, _ = prompts
    sae = SAE(SAEConfig(d_in=64, d_sae=128, hook_name="blocks.1.hook_resid_pre"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    with split.saes([sae], use_error_term=False):
        a, ca = split.run_with_cache(clean)
    with tiny.saes([sae], use_error_term=False):
        b, cb = tiny.run_with_cache(clean)
    assert torch.equal(a, b) and not torch.equal(a, tiny(clean))
    name = sae.name_of("hook_acts")
    assert torch.equal(ca[name], cb[name])


def test_load_with_a_device_map(tiny_dir, tiny, prompts):
    model = resid.load(tiny_dir, device_map={"blocks.0": "cpu", "blocks.1": "cpu"})
    assert model.layer_devices == (CPU, CPU)
    assert torch.equal(model(prompts[0]), tiny(prompts[0]))


# ---- real devices -------------------------------------------------------------------------


def _on_devices(tiny, plan: dict, prompts) -> None:
    """Logits, caches (each block's activations on its own device), sweeps and generation
    on the placed model against the model on the CPU."""
    clean, corrupted = prompts
    model = copy.deepcopy(tiny).to_devices(plan)
    first = model.layer_devices[0]
    torch.testing.assert_close(model(clean).cpu(), tiny(clean), rtol=1e-4, atol=1e-4)
    _, cache = model.run_with_cache(clean)
    for layer, device in enumerate(model.layer_devices):
        assert cache[f"blocks.{layer}.hook_resid_post"].device == device
    assert cache["hook_embed"].device == first
    torch.testing.assert_close(model.W_O.cpu(), tiny.W_O)
    _, cache = model.run_with_cache(clean, device="cpu")  # asked for: all on the CPU
    assert {t.device for t in cache.values()} == {CPU}
    metric = metrics.logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]), pos=-1)
    a = sweep(model, corrupted, clean, metric, "z", progress=False)
    b = sweep(tiny, corrupted, clean, metric, "z", progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
    a = model.generate(clean.to(first), max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    b = tiny.generate(clean, max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_one_gpu(tiny, prompts):
    _on_devices(tiny, {"blocks.0": "cpu", "blocks.1": "cuda:0"}, prompts)
    _on_devices(tiny, {"blocks.0": "cuda:0", "blocks.1": "cpu"}, prompts)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus(tiny, prompts):
    _on_devices(tiny, {"blocks.0": "cuda:0", "blocks.1": "cuda:1"}, prompts)
    model = copy.deepcopy(tiny).to_devices(n_devices=2)
    assert model.layer_devices == tuple(_devs("cuda:0", "cuda:1"))
