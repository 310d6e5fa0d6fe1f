"""What you observe is what ran (issue 10).

Reading a site never changes the arithmetic: caches and read-only hooks are computed beside
the forward pass, at every dtype. A hook that writes takes effect exactly as a hand-written
forward with the same edit. Hooks belong to the caller's thread or task, are removed by
identity, and backward hooks see autograd's gradients.

Every check compares against something outside the code it guards: ``model(t)`` with no
hook at all, a reference forward written below with plain torch ops from the Hugging Face
weights, ``transformers`` itself, ``torch.autograd.grad``, or the torch profiler.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_with, make_hf_gpt2
from torch.profiler import ProfilerActivity, profile

import resid
from resid import metrics
from resid.interventions import engine as engine_module
from resid.interventions.patching import patch, sweep

WIDE = dict(n_layer=2, n_head=12, n_embd=768, n_positions=32)  # GPT-2 small's width
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FILTERS = {
    "default": None,  # everything but hook_result
    "patterns": lambda n: n.endswith("hook_pattern"),
    "scales": lambda n: n.endswith("hook_scale"),
    "resid": lambda n: "hook_resid" in n,
}


def attached(model) -> list[str]:
    return model.attached_hooks()


@pytest.fixture(scope="module")
def wide_hf():
    return make_hf_gpt2(seed=5, **WIDE)


@pytest.fixture(scope="module")
def wide_dir(wide_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("wide")
    wide_hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide(wide_dir):
    """The 768-wide model in each dtype, loaded once."""
    return {dtype: resid.load(wide_dir, device="cpu", dtype=dtype) for dtype in DTYPES}


@pytest.fixture(scope="module")
def wide_tokens():
    return torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(11))


# ---- a reference forward, written plainly from the Hugging Face weights ----------------


def reference_forward(hf, tokens, edit=lambda name, act: act):
    """GPT-2 by hand, in fp32, from ``hf``'s state dict. ``edit(hook_name, act)`` returns the
    activation to use at the named site (TransformerLens' names and layouts):
    ``…hook_scale`` [b, p, 1], ``…hook_normalized`` [b, p, d], ``…attn.hook_q/k/v/z``
    [b, p, h, e], ``…attn.hook_attn_scores`` and ``…attn.hook_pattern`` [b, h, q, k]
    (scores masked with -inf), ``…attn.hook_result`` [b, p, h, d]."""
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    cfg = hf.config
    H, d = cfg.n_head, cfg.n_embd
    e, (b, T) = d // H, tokens.shape

    def ln(x, prefix, name):
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon).sqrt()
        scale = edit(f"{name}.hook_scale", scale)
        normalized = edit(f"{name}.hook_normalized", centred / scale)
        return normalized * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]

    x = sd["transformer.wte.weight"][tokens] + sd["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(cfg.n_layer):
        p, blk = f"transformer.h.{layer}", f"blocks.{layer}"
        h = ln(x, f"{p}.ln_1", f"{blk}.ln1")
        qkv = h @ sd[f"{p}.attn.c_attn.weight"] + sd[f"{p}.attn.c_attn.bias"]
        q, k, v = (t.reshape(b, T, H, e) for t in qkv.split(d, -1))
        q, k, v = (edit(f"{blk}.attn.hook_{n}", t) for n, t in zip("qkv", (q, k, v), strict=True))
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / e**0.5
        scores = edit(f"{blk}.attn.hook_attn_scores", scores.masked_fill(~causal, float("-inf")))
        pattern = edit(f"{blk}.attn.hook_pattern", scores.softmax(-1))
        z = edit(f"{blk}.attn.hook_z", torch.einsum("bhqk,bkhe->bqhe", pattern, v))
        W_O = sd[f"{p}.attn.c_proj.weight"].view(H, e, d)
        result = edit(f"{blk}.attn.hook_result", torch.einsum("bqhe,hed->bqhd", z, W_O))
        x = x + result.sum(2) + sd[f"{p}.attn.c_proj.bias"]
        h = ln(x, f"{p}.ln_2", f"{blk}.ln2")
        pre = h @ sd[f"{p}.mlp.c_fc.weight"] + sd[f"{p}.mlp.c_fc.bias"]
        post = F.gelu(pre, approximate="tanh")
        x = x + post @ sd[f"{p}.mlp.c_proj.weight"] + sd[f"{p}.mlp.c_proj.bias"]
    return ln(x, "transformer.ln_f", "ln_final") @ sd["transformer.wte.weight"].T


def test_reference_forward_is_the_model(tiny, tiny_hf, tokens):
    """The reference below is GPT-2: it matches resid (and so transformers) unedited."""
    with torch.no_grad():
        torch.testing.assert_close(
            reference_forward(tiny_hf, tokens), tiny(tokens), atol=1e-4, rtol=0
        )


# ---- observing never changes the result --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cache_and_observer_hooks_are_bit_identical(wide, wide_tokens, dtype):
    model = wide[dtype]
    plain = model(wide_tokens)
    assert plain.dtype == dtype and plain.abs().max() > 1
    deltas = {}
    for label, names_filter in FILTERS.items():
        logits, cache = model.run_with_cache(wide_tokens, names_filter=names_filter)
        deltas[label] = (logits.float() - plain.float()).abs().max().item()
        assert torch.equal(logits, plain), f"run_with_cache({label}) changed the logits"
        assert len(cache) > 0
        if label == "default":  # patterns and scales are fp32 whatever the model's dtype
            pattern = cache["blocks.1.attn.hook_pattern"]
            assert pattern.dtype == cache["blocks.1.ln2.hook_scale"].dtype == torch.float32
            torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 12, 16), atol=1e-6, rtol=0)
            assert cache["blocks.1.hook_resid_pre"].dtype == dtype

    seen = []

    def look(act, hook):  # returns None
        seen.append(float(act.float().abs().sum()))

    def read_in_place(act, hook):  # reads through views of the very tensor, writes nothing
        flat = act.view(-1) if act.is_contiguous() else act.reshape(-1)
        seen.append(flat[:3].tolist())
        seen.append(act.max().item())

    def same(act, hook):  # hands back the tensor it was given
        return act

    observers = (look, read_in_place, same)
    runs = [(f"{fn.__name__} everywhere", [(lambda n: True, fn)]) for fn in observers]
    runs += [
        (f"all three on {label}", [(f, fn) for fn in observers])
        for label, f in FILTERS.items()
        if f is not None
    ]
    for label, fwd_hooks in runs:
        with torch.no_grad():
            out = model.run_with_hooks(wide_tokens, fwd_hooks=fwd_hooks)
        deltas[label] = (out.float() - plain.float()).abs().max().item()
        assert torch.equal(out, plain), f"{label} changed the logits"
    assert seen and attached(model) == []
    assert all(d == 0.0 for d in deltas.values()), deltas


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cache_equals_what_an_uncached_runs_hook_sees(tiny_dir, wide, tokens, wide_tokens, dtype):
    """Site by site, bit for bit: the cache of everything against a run where one observer
    hook records that site alone. Every site of the tiny model in every dtype; the 768-wide
    model's last block and ln_final in fp32 (the layers past 0 are where it used to differ)."""
    runs = [(resid.load(tiny_dir, device="cpu", dtype=dtype), tokens, lambda n: True)]
    if dtype == torch.float32:
        runs.append((wide[dtype], wide_tokens, lambda n: n.startswith(("blocks.1.", "ln_final"))))
    for model, t, sites in runs:
        _site_by_site(model, t, [n for n in model.hook_names if sites(n)])


def _site_by_site(model, tokens, names):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
        assert sorted(cache) == sorted(model.hook_names)
        for name in names:
            got = []
            model.run_with_hooks(  # ln_final runs, the unembedding need not
                tokens,
                return_type=None,
                fwd_hooks=[(name, lambda act, hook, got=got: got.append(act.clone()))],
            )
            assert len(got) == 1
            assert torch.equal(got[0], cache[name]), name


def test_profiler_sees_sdpa_and_no_softmax(tiny, tokens):
    """The unhooked forward runs the fused attention kernel, never an explicit softmax;
    caching patterns adds the pattern's own softmax, once per layer, and nothing else."""

    def ops(fn) -> dict[str, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key: e.count for e in prof.key_averages()}

    def count(table, *names):
        return sum(n for key, n in table.items() if key in names)

    softmax = ("aten::softmax", "aten::_softmax", "aten::_safe_softmax")
    sdpa = ("aten::scaled_dot_product_attention",)
    L = tiny.cfg.n_layers
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            plain = ops(lambda: tiny(tokens))
            lean = ops(lambda: tiny.run_with_cache(tokens, names_filter=FILTERS["resid"]))
            patterns = ops(lambda: tiny.run_with_cache(tokens, names_filter=FILTERS["patterns"]))
        assert count(plain, *sdpa) == L and count(plain, *softmax) == 0
        assert count(plain, "aten::layer_norm") == 2 * L + 1
        assert count(lean, *sdpa) == L and count(lean, *softmax) == 0
        assert count(patterns, *sdpa) == L and count(patterns, "aten::softmax") == L


# ---- a hook that writes takes effect exactly ------------------------------------------


def bos_row(layer: int, head: int, query: int):
    """Replace one row of one head's pattern with all attention on BOS (a valid row)."""

    def edit(pattern):
        pattern = pattern.clone()
        pattern[:, head, query] = 0
        pattern[:, head, query, 0] = 1
        return pattern

    return f"blocks.{layer}.attn.hook_pattern", edit


@pytest.mark.parametrize(
    "in_place, grad", [(False, False), (True, True)], ids=["returned-no_grad", "in_place-grad"]
)
def test_pattern_and_scale_edits_match_a_hand_written_forward(
    tiny, tiny_hf, tokens, in_place, grad
):
    name, edit = bos_row(layer=1, head=2, query=9)
    scale_name = "blocks.0.ln2.hook_scale"

    def hook_pattern(p, hook):
        if not in_place:
            return edit(p)
        p[:, 2, 9] = 0
        p[:, 2, 9, 0] = 1

    def hook_scale(s, hook):
        if not in_place:
            return s * 2
        s.mul_(2)

    def ref_edit(site, act):
        if site == name:
            return edit(act)
        return act * 2 if site == scale_name else act

    with torch.set_grad_enabled(grad):
        plain = tiny(tokens)
        for hooks_, sites in (
            ([(name, hook_pattern)], {name}),
            ([(scale_name, hook_scale)], {scale_name}),
            ([(name, hook_pattern), (scale_name, hook_scale)], {name, scale_name}),
        ):
            ours = tiny.run_with_hooks(tokens, fwd_hooks=hooks_)
            ref = reference_forward(
                tiny_hf, tokens, lambda s, a, sites=sites: ref_edit(s, a) if s in sites else a
            )
            assert (ref - plain).abs().max() > 0.05  # the edit matters
            torch.testing.assert_close(ours, ref.to(ours), atol=1e-4, rtol=0)
        if grad:  # autograd saved nothing the in-place edits touched
            ours.pow(2).mean().backward()
            tiny.zero_grad(set_to_none=True)
    if not in_place:  # the pattern edit leaves earlier queries alone
        ours = tiny.run_with_hooks(tokens, fwd_hooks=[(name, hook_pattern)])
        torch.testing.assert_close(ours[:, :9], plain[:, :9], atol=1e-5, rtol=0)
    assert attached(tiny) == []


BESIDE = [  # sites computed beside a fused kernel (the output is rebuilt when one changes)
    "blocks.1.ln1.hook_scale",
    "blocks.1.ln2.hook_normalized",
    "blocks.1.attn.hook_attn_scores",
    "blocks.1.attn.hook_pattern",
    "blocks.1.attn.hook_result",
    "ln_final.hook_normalized",
]


@pytest.mark.parametrize("site", BESIDE)
@pytest.mark.parametrize(
    "in_place, grad",
    [(True, False), (True, True), (False, True)],
    ids=["in_place", "in_place-grad", "returned-grad"],
)
def test_edits_beside_fused_kernels_match_a_hand_written_forward(
    tiny, tiny_hf, tokens, site, in_place, grad
):
    """An edit at a site the fused kernels never build (it is computed beside them) takes
    effect as in a plain forward with the same edit, returned or written in place."""

    def scale_up(act, hook):
        if not in_place:
            return act * 1.5
        act.mul_(1.5)

    ref = reference_forward(tiny_hf, tokens, lambda s, a: a * 1.5 if s == site else a)
    with torch.set_grad_enabled(grad):
        ours = tiny.run_with_hooks(tokens, fwd_hooks=[(site, scale_up)])
        plain = tiny(tokens)
    assert (ref - plain).abs().max() > 0.01  # the edit matters
    torch.testing.assert_close(ours, ref.to(ours), atol=1e-4, rtol=0)


LLAMA_SHAPE = resid.Config(n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=128, d_vocab=100,
                           n_ctx=32, normalization="RMS", positional="rotary", n_kv_heads=2,
                           gated_mlp=True)  # fmt: skip


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_handing_back_the_same_values_changes_nothing(tiny, tokens, shape, grad):
    """At every site, a hook that returns a copy of what it saw (as an SAE spliced with its
    error term does, or patching a run into itself) leaves the logits bit-identical to the
    model's, the sites computed beside fused kernels included."""
    torch.manual_seed(0)
    model = tiny if shape == "gpt2" else resid.Model(LLAMA_SHAPE)
    t = tokens if shape == "gpt2" else tokens % LLAMA_SHAPE.d_vocab
    with torch.no_grad():
        ref = model(t)
    with torch.set_grad_enabled(grad):
        for site in model.hook_dict:
            out = model.run_with_hooks(t, fwd_hooks=[(site, lambda act, hook: act.clone())])
            assert torch.equal(out, ref), site
    assert attached(model) == []


@pytest.mark.parametrize("site", ["q", "k", "v", "z"])
def test_in_place_head_edits_work_under_autograd(tiny, tiny_hf, tokens, site):
    """TransformerLens' idiom, ``act[:, :, 0] = 0`` returning None, in default grad mode,
    then a backward pass through it."""
    name = f"blocks.0.attn.hook_{site}"

    def zero_head_0(act, hook):
        act[:, :, 0] = 0

    def ref_edit(s, act):
        if s != name:
            return act
        act = act.clone()
        act[:, :, 0] = 0
        return act

    assert torch.is_grad_enabled()
    ours = tiny.run_with_hooks(tokens, fwd_hooks=[(name, zero_head_0)])
    ref = reference_forward(tiny_hf, tokens, ref_edit)
    plain = tiny(tokens)
    assert (ref - plain).abs().max() > 0.05
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ours.requires_grad
    ours.pow(2).mean().backward()  # raised "… is a view … modified inplace" before
    assert tiny.blocks[0].attn.W_QKV.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_return_type_none_runs_ln_final(tiny, tokens):
    seen = {}

    def keep(act, hook):
        seen[hook.name] = act.detach().clone()

    names = ["ln_final.hook_scale", "ln_final.hook_normalized"]
    with torch.no_grad():
        assert tiny.run_with_hooks(tokens, return_type=None, fwd_hooks=[(names, keep)]) is None
        assert sorted(seen) == sorted(names)
        resid_post = []
        tiny.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, h: resid_post.append(a))]
        )
    # what ln_final saw is the LayerNorm of the last residual stream, by hand
    x = resid_post[0]
    centred = x - x.mean(-1, keepdim=True)
    scale = centred.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(seen["ln_final.hook_scale"], scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["ln_final.hook_normalized"], centred / scale, atol=1e-5, rtol=0)


# ---- the sweep's equal-activation skip -----------------------------------------------


def test_sweep_skips_every_cell_where_clean_and_corrupted_agree(wide, monkeypatch):
    """Clean and corrupted share their first 6 tokens, so every layer's residual stream
    agrees there, bit for bit, between a default cache (clean) and the sweep's lean one
    (corrupted): those cells are the baseline and are never run."""
    model = wide[torch.float32]
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 50257, (2, 10), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 6:] = torch.randint(0, 50257, (2, 4), generator=gen)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)  # every site, as users cache
    metric = metrics.logit_diff(answer=11, wrong=22)

    ran = []
    original = engine_module.Engine.run

    def counting_run(self, cells, start):  # observes, then runs the real thing
        ran.extend(cell.index for cell in cells)
        return original(self, cells, start)

    monkeypatch.setattr(engine_module.Engine, "run", counting_run)
    result = sweep(model, corrupted, clean_cache, metric, "resid_pre", progress=False)
    L = model.cfg.n_layers
    assert sorted(ran) == [(layer, pos) for layer in range(L) for pos in range(6, 10)]
    values = result.values
    assert torch.equal(values[:, :6], torch.full((L, 6), result.baseline))
    assert (values[:, 6:] != result.baseline).all()
    # the skipped cells are what a real patch gives, and a run cell is too
    for layer, pos in [(L - 1, 0), (L - 1, 5), (1, 7)]:
        one = patch(
            model, corrupted, f"blocks.{layer}.hook_resid_pre", clean_cache, pos=pos, metric=metric
        )
        torch.testing.assert_close(values[layer, pos], one, atol=1e-4, rtol=0)


# ---- hooks belong to the caller's thread or task -------------------------------------


def test_two_threads_each_get_their_single_threaded_results(tiny):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50257, (2, 12), generator=gen) for _ in range(2)]
    steer = torch.randn(64, generator=gen)

    def ablate(head):
        def fn(z, hook):
            z[:, :, head] = 0

        return fn

    def add_steer(resid, hook):
        return resid + steer

    def calls(i):
        tokens = prompts[i]
        return [
            lambda: tiny.run_with_cache(tokens, names_filter=FILTERS["resid"]),
            lambda: tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate(i))]),
            lambda: tiny(tokens),
        ]

    def flatten(out):
        if isinstance(out, tuple):
            logits, cache = out
            return [logits, *(cache[n] for n in sorted(cache))], sorted(cache)
        return [out], []

    # thread 1 runs everything inside an enclosing steering hook of its own
    enclosing = [None, [("blocks.0.hook_resid_pre", add_steer)]]

    def in_context(i, fn):
        if enclosing[i] is None:
            return fn()
        with tiny.hooks(enclosing[i]):
            return fn()

    with torch.no_grad():
        expected = [[flatten(in_context(i, fn)) for fn in calls(i)] for i in range(2)]
    assert not torch.equal(expected[0][2][0][0], expected[0][1][0][0])  # the ablation matters
    failures: list[str] = []
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            fns = calls(i)
            barrier.wait()
            with torch.no_grad(), tiny.hooks(enclosing[i] or []):
                for k in range(50):
                    got = flatten(fns[k % 3]())
                    want = expected[i][k % 3]
                    if got[1] != want[1] or not all(
                        torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True)
                    ):
                        failures.append(f"thread {i}, call {k}")
            if tiny.attached_hooks():  # after its own with-block, none of its hooks
                failures.append(f"thread {i} left hooks")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert attached(tiny) == []


def test_asyncio_tasks_do_not_see_each_others_hooks(tiny, tokens):
    with torch.no_grad():
        plain = tiny(tokens)

    def zero_mlp(out, hook):
        return torch.zeros_like(out)

    async def ablating():
        with tiny.hooks([("blocks.1.hook_mlp_out", zero_mlp)]):
            await asyncio.sleep(0)  # the other task runs while these hooks are attached
            with torch.no_grad():
                out = tiny(tokens)
            await asyncio.sleep(0)
        return out

    async def plain_task():
        outs = []
        for _ in range(3):
            assert tiny.attached_hooks() == []
            with torch.no_grad():
                outs.append(tiny(tokens))
            await asyncio.sleep(0)
        return outs

    async def both():
        return await asyncio.gather(ablating(), plain_task())

    ablated, outs = asyncio.run(both())
    assert all(torch.equal(o, plain) for o in outs)
    assert (ablated - plain).abs().max() > 1e-2
    assert attached(tiny) == []


@dataclass
class AddVector:
    """A dataclass hook holding a tensor: its generated ``__eq__`` compares tensors, so
    removal by equality raised "Boolean value of Tensor … is ambiguous"."""

    v: torch.Tensor

    def __call__(self, act, hook):
        return act + self.v


def test_nested_dataclass_hooks_detach_by_identity(tiny, tokens):
    site = "blocks.0.hook_resid_pre"
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    outer, inner, twin = AddVector(v), AddVector(2 * v), AddVector(v.clone())
    with torch.no_grad():
        plain = tiny(tokens)
        only_outer = tiny.run_with_hooks(tokens, fwd_hooks=[(site, outer)])
        with tiny.hooks([(site, outer)]):
            with tiny.hooks([(site, inner), (site, twin), (site, outer)]):
                both = tiny(tokens)
                assert len(tiny.hook_dict[site].fns) == 4
            fns = tiny.hook_dict[site].fns
            assert len(fns) == 1 and fns[0] is outer
            after_inner = tiny(tokens)
        assert attached(tiny) == []
        again = tiny(tokens)
    assert torch.equal(after_inner, only_outer)
    assert torch.equal(again, plain)
    assert (both - only_outer).abs().max() > 1e-2


# ---- backward hooks and gradient caches -----------------------------------------------


def test_backward_hooks_see_autograds_gradients(tiny, tokens):
    """At every site, in one forward: a forward hook keeps the activation (in the graph),
    a backward hook records its gradient, and ``torch.autograd.grad`` computes it (every
    site but the token ids, integers with no gradient)."""
    acts, grads = {}, {}

    def keep(act, hook):
        acts[hook.name] = act

    def keep_grad(grad, hook):
        grads[hook.name] = grad.clone()

    everything = lambda n: n != "hook_tokens"  # noqa: E731
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[(everything, keep)],
        bwd_hooks=[(everything, keep_grad)],
    )
    assert attached(tiny) == []  # backward hooks stay with the graph, not the model
    names = list(acts)
    assert sorted(names) == sorted(n for n in tiny.hook_names if n != "hook_tokens")
    expected = torch.autograd.grad(loss, [acts[n] for n in names], retain_graph=True)
    loss.backward()
    tiny.zero_grad(set_to_none=True)
    assert sorted(grads) == sorted(names)  # every site, patterns and scales included
    for name, want in zip(names, expected, strict=True):
        assert torch.equal(grads[name], want), name
    # a backward hook that returns a gradient replaces it upstream
    seen = []
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[("hook_embed", keep)],
        bwd_hooks=[
            ("blocks.0.hook_resid_pre", lambda g, hook: torch.zeros_like(g)),
            ("hook_embed", lambda g, hook: seen.append(g)),
        ],
    )
    loss.backward()
    tiny.zero_grad(set_to_none=True)
    assert len(seen) == 1 and torch.equal(seen[0], torch.zeros_like(acts["hook_embed"]))


def test_incl_bwd_gradients_equal_transformers_autograd(tiny, tiny_hf, tokens):
    """``run_with_cache(..., incl_bwd=True)`` against autograd through ``transformers``
    (eager attention, so its attention weights are in the graph)."""
    loss, cache = tiny.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    tiny.zero_grad(set_to_none=True)
    hf = hf_with(tiny_hf, "eager")
    out = hf(tokens, labels=tokens, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    L = tiny.cfg.n_layers
    wrt = [out.hidden_states[layer] for layer in range(L)] + list(out.attentions)
    hf_grads = torch.autograd.grad(out.loss, wrt)
    hf.zero_grad(set_to_none=True)
    for layer in range(L):
        want_resid, want_pattern = hf_grads[layer], hf_grads[L + layer]
        assert want_resid.abs().max() > 1e-4 and want_pattern.abs().max() > 1e-4
        got = cache[f"blocks.{layer}.hook_resid_pre_grad"]
        torch.testing.assert_close(got, want_resid, atol=1e-6, rtol=1e-4)
        got = cache[f"blocks.{layer}.attn.hook_pattern_grad"]
        torch.testing.assert_close(got, want_pattern, atol=1e-6, rtol=1e-4)
    # the default cache: every site but the per-head results and inputs, the MLP's copy of
    # the stream, and the token ids
    left_out = ("hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
                "hook_mlp_in")  # fmt: skip
    names = [n for n in tiny.hook_names if not n.endswith(left_out) and n != "hook_tokens"]
    assert sorted(k for k in cache if k.endswith("_grad")) == sorted(f"{n}_grad" for n in names)


def test_incl_bwd_gradients_equal_autograd_on_the_plain_forward(tiny, tokens):
    """The in-path sites' gradients from the cache equal ``torch.autograd.grad`` through
    a forward with no backward hooks (to fp32 rounding: with a backward hook on a pattern
    or scale, the gradient flows through their explicit computation)."""
    _, cache = tiny.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    tiny.zero_grad(set_to_none=True)
    sites = ["hook_embed", "blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
    acts = {}
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[(sites, lambda act, hook: acts.__setitem__(hook.name, act))],
    )
    grads = torch.autograd.grad(loss, [acts[s] for s in sites])
    for site, want in zip(sites, grads, strict=True):
        torch.testing.assert_close(cache[f"{site}_grad"], want, atol=1e-7, rtol=1e-4)
