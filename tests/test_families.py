"""Beyond GPT-2: GPT-Neo, Pythia (GPT-NeoX), Llama (GQA, Llama 3 rotary scaling), Mistral
(sliding window) and Qwen2 (q/k/v biases), each a tiny random `transformers` model saved
with `save_pretrained` and loaded through resid, checked against Hugging Face and laws."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from processes import timed_loads

import resid
from resid import CheckpointError, metrics
from resid.interventions.patching import sweep
from resid.io.references import random_hf_family

V = 300  # random_hf_family's tiny vocabulary: BOS 0, EOS 1
FAMILIES = ["gpt_neo", "pythia", "llama", "mistral", "qwen2"]


def save_tokenizer(folder) -> None:
    """A word-level tokenizer of the tiny vocabulary, saved as transformers would, with a
    BOS that is not GPT-2's (as Llama's ``<s>`` is not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", "</s>"] + [f"w{i}" for i in range(2, V - 1)] + ["<unk>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    hf = random_hf_family(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    save_tokenizer(folder)
    return request.param, hf, resid.load(folder, device="cpu"), folder


TOKENS = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(1))


def test_logits_and_every_layer_match_hugging_face(family):
    name, hf, model, _ = family
    with torch.no_grad():
        ref = hf(TOKENS, output_hidden_states=True)
        logits, cache = model.run_with_cache(TOKENS)
        plain = model(TOKENS)
    assert (logits - ref.logits).abs().max() < 1e-4, name
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (ours - ref.hidden_states[layer]).abs().max() < 1e-4, (name, layer)
    assert torch.equal(logits, plain)  # observing changes nothing, in every family


def test_greedy_generation_matches_hugging_face(family):
    name, hf, model, _ = family
    prompt = TOKENS[:1, :6]
    ours = model.generate(prompt, max_new_tokens=10, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(family, side):
    name, _, model, _ = family
    rows = [TOKENS[0, :12], TOKENS[1, :7]]
    width = 12
    tokens = torch.ones(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        at = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, at], mask[i, at] = row, True
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            assert (batched[i][mask[i]] - alone).abs().max() < 1e-5, (name, side, i)


def test_decomposition_sums_to_the_stream(family):
    name, _, model, _ = family
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    for layer, where in [(1, "pre"), (None, "final")]:
        stream = cache.stream(model.cfg.n_layers if layer is None else layer, where).tensor
        total = cache.decompose_resid(layer, where).sum()
        assert (total - stream).abs().max() <= 1e-5 * stream.abs().max(), name
    target = 7
    dla = cache.logit_attribution(target)
    with torch.no_grad():
        logits = model(TOKENS)
    torch.testing.assert_close(dla.sum(), logits[..., target], atol=1e-4, rtol=0)


def test_neurons_equal_hook_post(family):
    name, _, model, _ = family
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
        for layer, index in [(0, 3), (1, 17)]:
            n = model.neuron(layer, index)
            got = n.activation(cache.stream(layer, "pre" if n._block.parallel else "mid"))
            want = cache[f"blocks.{layer}.mlp.hook_post"][..., index]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if model.cfg.gated_mlp:
        assert n.gated and n.gate.shape == (model.cfg.d_model,)


def test_rotary_qk_at_an_offset_reproduces_the_scores(family):
    name, _, model, _ = family
    if model.cfg.positional != "rotary":
        pytest.skip(f"{name} has learned positions")
    layer, h = 1, 2
    head = model.head(layer, h)
    with pytest.raises(ValueError, match="qk_at"):
        _ = head.qk
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS[:1])
    x = cache[f"blocks.{layer}.ln1.hook_normalized"][0] * model.blocks[layer].ln1.w
    if model.cfg.normalization == "LN":
        x = x + model.blocks[layer].ln1.b
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, h]
    scale = model.blocks[layer].attn.scale
    for i, j in [(5, 5), (7, 3), (11, 8)]:  # within Mistral's window of 5
        qk = head.qk_at(i - j)
        bias_free = (x[i] @ qk.A) @ (qk.B @ x[j])
        if model.cfg.attn_bias:  # the query and key biases, rotated with them
            continue
        torch.testing.assert_close(bias_free * scale, scores[i, j], atol=1e-4, rtol=1e-4)


def test_gqa_heads_share_views(family):
    name, _, model, _ = family
    if model.cfg.kv_heads == model.cfg.n_heads:
        pytest.skip(f"{name} has one key/value head per query head")
    a, b = model.head(0, 0), model.head(0, 1)
    assert a.shares_kv_with == b.shares_kv_with and len(a.shares_kv_with) > 1
    assert a.W_K.data_ptr() == b.W_K.data_ptr()  # views of the same weights, not copies
    assert (
        a.W_K.untyped_storage().data_ptr()
        == model.blocks[0].attn.W_QKV.untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("site", ["resid_pre", "z", "mlp_out"])
def test_sweeps_equal_one_forward_per_cell(family, site):
    name, _, model, _ = family
    clean = TOKENS[:, :6].clone()
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 5) % V
    metric = metrics.logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]), pos=-1)
    result = sweep(model, corrupted, clean, metric, site, by_pos=site != "z", progress=False)
    _, cache = model.run_with_cache(clean)
    for layer in range(model.cfg.n_layers):
        hook = resid.act_name(site, layer)
        for p in range(6) if site != "z" else [None]:
            heads = range(model.cfg.n_heads) if site == "z" else [None]
            for h in heads:

                def put(act, hook_point, p=p, h=h, hook=hook):
                    act = act.clone()
                    if h is None:
                        act[:, p] = cache[hook][:, p]
                    else:
                        act[:, :, h] = cache[hook][:, :, h]
                    return act

                with torch.no_grad():
                    value = metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook, put)]))
                got = result.values[layer, p] if h is None else result.values[layer, h]
                assert abs(float(got) - float(value)) < 1e-4, (name, site, layer, p, h)


def test_bad_configs_are_checkpoint_errors(family, tmp_path):
    name, _, _, folder = family
    good = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    heads = "num_heads" if name == "gpt_neo" else "num_attention_heads"
    bad = {
        "unsupported": ({"model_type": "bert", "architectures": ["BertModel"]}, "supports"),
        # 3 heads do not split a width of 64: the message names the heads and their number
        "heads": ({heads: 3}, r"\b3\b.{0,20}heads|heads\b.{0,80}\b3\b"),
        "shapes": ({"intermediate_size": 100, "vocab_size": V}, "mis-shaped"),
    }
    if name not in ("gpt_neo",):
        bad["rotary"] = (
            {"rotary_pct": 1.5, "rope_parameters": {"partial_rotary_factor": 1.5}},
            "rotary",
        )
    if name in ("llama", "mistral", "qwen2"):
        bad["gqa"] = ({"num_key_value_heads": 3}, "n_kv_heads")
    for change, message in bad.values():
        (tmp_path / "config.json").write_text(json.dumps(good | change))
        with pytest.raises(CheckpointError, match=message):
            resid.load(tmp_path, device="cpu")


def test_hook_sites_match_transformer_lens_bridge(family):
    """Every site both have, against TransformerLens 4.3's bridge over the same weights."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    from resid.io.references import hf_tokenizer

    name, hf, model, folder = family
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=hf, device="cpu", tokenizer=hf_tokenizer()
        )
        with torch.no_grad():
            _, theirs = bridge.run_with_cache(TOKENS)
            _, ours = model.run_with_cache(TOKENS)
    shared = [n for n in model.hook_names if n in theirs and theirs[n].shape == ours[n].shape]
    assert len(shared) >= 8 * model.cfg.n_layers, (name, shared)
    if name == "gpt_neo":  # the bridge's GPT-Neo hook_attn_scores holds the softmaxed pattern
        for layer in range(model.cfg.n_layers):
            n = f"blocks.{layer}.attn.hook_attn_scores"
            torch.testing.assert_close(theirs[n], ours[n.replace("attn_scores", "pattern")])
            shared.remove(n)
    for n in shared:
        a, b = ours[n], theirs[n]
        masked = torch.isinf(a) | (b < -1e30)  # masked scores: -inf here, -inf or min there
        assert (a[~masked] - b[~masked]).abs().max() <= 1e-4, (name, n)


def test_save_refuses_other_families(family, tmp_path):
    name, _, model, _ = family
    with pytest.raises(ValueError, match="writes GPT-2 checkpoints"):
        resid.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_and_tokenizer(family):
    """``resid compare`` on every family: Hugging Face (eager, sdpa) and the bridge agree;
    strings get the family's own BOS."""
    from resid.io.compare import compare

    name, _, model, folder = family
    assert model.to_tokens("w5 w7")[0].tolist() == [0, 5, 7]  # <s> first, not <|endoftext|>
    report = compare(str(folder), prompts=["w3 w4 w5 w6", "w9 w8 w7"], device="cpu")
    assert report.ok, (name, report)
    assert {r.reference for r in report.rows} >= {"transformers (eager)", "transformers (sdpa)"}


def test_detectors_attention_pages_and_saes(family, tmp_path):
    """The rest of the toolkit runs on every family: detectors (whose scores equal those
    computed by hand from the cached patterns), `resid attention`, and a spliced SAE that
    leaves the logits unchanged."""
    from resid.analysis.detectors import head_scores, previous_token_score
    from resid.cli import main
    from resid.sae import SAE, SAEConfig

    name, _, model, folder = family
    tokens = TOKENS[:1]
    scores = head_scores(model, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        by_hand = pattern[0].diagonal(-1, -2, -1).mean(-1)  # attention to the previous token
        torch.testing.assert_close(scores["previous_token"].values[layer], by_hand)
        torch.testing.assert_close(previous_token_score(pattern), by_hand)

    out = tmp_path / "pages"
    assert main(["attention", str(folder), "w3 w4 w5 w6", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0  # fmt: skip
    assert (out / "index.html").is_file()

    site = "blocks.1.hook_resid_pre"
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=128, hook_name=site))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
        plain = model(tokens)
        with model.saes([sae]):
            logits, sae_cache = model.run_with_cache(tokens)
    assert torch.equal(logits, plain) and f"{site}.sae.hook_acts" in sae_cache


def test_attribution_and_path_patching(family):
    """Attribution patching is exact where the metric is linear in the site (the final
    norm's output); path patching to the logits equals a forward written here that takes
    the sender's z from the clean run and freezes every other head's z at the corrupted."""
    from resid.interventions.patching import attribution_patch
    from resid.interventions.path_patching import path_patch

    name, _, model, _ = family
    clean = TOKENS[:, :6].clone()
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 9) % V
    metric = metrics.logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]), pos=-1)
    site = "ln_final.hook_normalized"
    _, cache = model.run_with_cache(clean)
    est = attribution_patch(model, corrupted, clean, metric, site)
    for p in range(6):

        def put(act, hook, p=p):
            act = act.clone()
            act[:, p] = cache[site][:, p]
            return act

        with torch.no_grad():
            real = metric(model.run_with_hooks(corrupted, fwd_hooks=[(site, put)]))
        assert abs(float(est.values[p]) - float(real)) < 1e-4, (name, p)

    _, corr = model.run_with_cache(corrupted)
    sender = (0, 1)

    def freeze(z, hook):
        layer = int(hook.name.split(".")[1])
        out = corr[hook.name].clone()
        if layer == sender[0]:
            out[:, :, sender[1]] = cache[hook.name][:, :, sender[1]]
        return out

    with torch.no_grad():
        by_hand = metric(
            model.run_with_hooks(corrupted, fwd_hooks=[(lambda n: n.endswith("hook_z"), freeze)])
        )
    got = path_patch(model, corrupted, cache, metric, senders=[sender], receivers="logits")
    assert abs(float(got) - float(by_hand)) < 1e-4, name


# ---- loading: from_hf, hostile configs, tokenizers, fp8 ----------------------------------


def test_from_hf_matches_and_leaves_the_weights_alone(family):
    """``from_hf`` (the entry point GGUF and in-memory weights use) gives Hugging Face's
    logits; the caller's tensors are neither modified nor shared with the model."""
    from resid.io.loading import from_hf

    name = family[0]
    hf = random_hf_family(name)  # fresh: other tests wrap the shared one (the bridge)
    weights = hf.state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    model = from_hf(hf.config.to_dict(), weights, source=f"{name} in memory", device="cpu")
    with torch.no_grad():
        ref = hf(TOKENS).logits
        assert (model(TOKENS) - ref).abs().max() < 1e-4, name
        for p in model.parameters():
            p.add_(1.0)  # editing the model ...
    for k, v in weights.items():  # ... leaves the caller's tensors as they were
        assert torch.equal(v, before[k]), (name, k)


def test_from_hf_in_bfloat16_matches_a_bfloat16_load(family):
    from resid.io.loading import from_hf

    name, _, _, folder = family
    hf = random_hf_family(name)  # the same weights as the saved folder's
    a = from_hf(hf.config.to_dict(), hf.state_dict(), source=name, dtype=torch.bfloat16)
    b = resid.load(folder, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    with torch.no_grad():
        assert torch.equal(a(TOKENS), b(TOKENS)), name


# every config number that sizes a table, a tuple or a tensor, at a value no machine holds
BOMBS = {
    "layers 1e9": lambda n: {n: 10**9},
    "layers 1e7, local attention listed": lambda n: {n: 10**7, "attention_layers": ["local"] * 3},
    "width 1e12": lambda n: {"hidden_size": 10**12},
    "vocabulary 1e12": lambda n: {"vocab_size": 10**12},
    "context 1e15": lambda n: {"max_position_embeddings": 10**15},
    "mlp 1e12": lambda n: {"intermediate_size": 10**12},
    "kv heads 1e9": lambda n: {"num_key_value_heads": 10**9},
    "window 1e12 over 1e9 layers": lambda n: {n: 10**9, "sliding_window": 10**12,
                                              "use_sliding_window": True, "max_window_layers": 0},
}  # fmt: skip


def test_size_bombs_fail_fast_and_small(tmp_path):
    """A config whose numbers would size huge tables is refused with a CheckpointError in
    well under a second and without a large allocation, in every family (issue 20)."""
    folders = []
    for name in FAMILIES:
        hf = random_hf_family(name)
        base = tmp_path / name
        hf.save_pretrained(base)
        good = json.loads((base / "config.json").read_text())
        layers_key = "num_layers" if name == "gpt_neo" else "num_hidden_layers"
        for label, change in BOMBS.items():
            folder = tmp_path / f"{name}-{label.replace(' ', '_')}"
            folder.mkdir()
            (folder / "model.safetensors").symlink_to(base / "model.safetensors")
            (folder / "config.json").write_text(json.dumps(good | change(layers_key)))
            folders.append(folder)
    for r in timed_loads(folders, warm=tmp_path / "llama", timeout=300):
        # a number that sizes a tensor must meet the weights' shapes; GPT-Neo and Pythia have
        # no key/value head count and rotary families no table of positions: those may load
        sizing = ("layers", "width", "vocabulary", "mlp")
        assert r["error"] or not any(w in r["path"] for w in sizing), r
        assert r["seconds"] < 1.0 and r["extra_mb"] < 100, r
        if "layers" in r["path"]:
            assert "blocks but the weights hold 2" in r["error"], r


def test_a_broken_tokenizer_is_a_checkpoint_error(family, tmp_path):
    """A tokenizer.json that does not parse: resid.load raises CheckpointError naming the
    file, and `resid info` prints one line, not a traceback."""
    import subprocess
    import sys

    name, _, _, folder = family
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "model.safetensors"):
        (broken / f).symlink_to(folder / f)
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        resid.load(broken, device="cpu")
    done = subprocess.run([sys.executable, "-m", "resid", "info", str(broken), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "tokenizer.json" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_weights_load(family, tmp_path, fp8):
    """fp8 checkpoints load (the finiteness check works on them), into the dtype asked,
    with the logits of the same fp8 values held by Hugging Face in float32."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    name, hf, _, folder = family
    sd = safetensors.torch.load_file(str(folder / "model.safetensors"))
    for sub, weights in (("fp8", {k: v.to(fp8) for k, v in sd.items()}),
                         ("rounded", {k: v.to(fp8).float() for k, v in sd.items()})):  # fmt: skip
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text((folder / "config.json").read_text())
        safetensors.torch.save_file(weights, str(tmp_path / sub / "model.safetensors"))
    model = resid.load(tmp_path / "fp8", device="cpu", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "rounded").eval()
    with torch.no_grad():
        assert (model(TOKENS) - ref(TOKENS).logits).abs().max() < 1e-4, name
