"""Attribution graphs: the completeness law on GPT-2- and Llama-shaped models (rotary,
RMSNorm, grouped-query attention), agreement with circuit-tracer's adjacency on a fixture
it produced, pruning, the saved folder, bad input, and interventions from the graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import resid
from resid.core.config import Config
from resid.graphs import attribute, logit_targets
from resid.sae import SAEError, Transcoder, TranscoderConfig, load_transcoders

DATA = Path(__file__).parent / "data" / "graphs"

GPT2 = Config(n_layers=3, n_heads=4, d_model=32, d_head=8, d_mlp=64, d_vocab=60, n_ctx=24)
LLAMA = Config(n_layers=3, n_heads=4, n_kv_heads=2, d_model=32, d_head=8, d_mlp=48, d_vocab=60,
               n_ctx=24, normalization="RMS", positional="rotary", act_fn="silu",
               gated_mlp=True, attn_bias=False, attn_out_bias=False, mlp_bias=False,
               tie_embeddings=False)  # fmt: skip


def random_model(cfg: Config, seed: int = 0) -> resid.Model:
    torch.manual_seed(seed)
    model = resid.Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(".w") else 0.0, 0.3 if p.dim() > 1 else 0.1)
    return model.eval()


def random_transcoders(model, read="ln2.hook_normalized", skip=True, d_sae=48, seed=1):
    torch.manual_seed(seed)
    d = model.cfg.d_model
    out = []
    for layer in range(model.cfg.n_layers):
        tc = Transcoder(TranscoderConfig(
            d_in=d, d_sae=d_sae, d_out=d, hook_name=f"blocks.{layer}.{read}",
            hook_name_out=f"blocks.{layer}.hook_mlp_out", skip=skip))  # fmt: skip
        with torch.no_grad():
            for p in tc.parameters():
                p.normal_(0.0, 0.3)
        out.append(tc)
    return out


def zero_source_run(model, tcs, tokens):
    """The frozen replacement model with every node's value set to zero (embeddings,
    features, errors), written with forward hooks only: patterns and scales replaced by the
    real forward's, each MLP output by ``b_dec + skip(x)`` (plus, at the first position,
    the part circuit-tracer leaves out of the graph). Returns (each layer's transcoder
    input, the final normalised stream): what every node's bias terms add up to."""
    n = model.cfg.n_layers
    frozen = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    frozen += [f"blocks.{i}.{ln}.hook_scale" for i in range(n) for ln in ("ln1", "ln2")]
    frozen += ["ln_final.hook_scale"]
    sites = frozen + [t.hook_name for t in tcs] + [t.hook_name_out for t in tcs]
    with torch.no_grad():
        _, real = model.run_with_cache(tokens[None], names_filter=sites)
        first = {}
        for t in tcs:  # what the graph leaves out: the first position's MLP output
            x0 = real[t.hook_name][0, 0]
            first[t.layer] = real[t.hook_name_out][0, 0] - t.b_dec - t.skip(x0)
        seen = {}

        def read(x, hook):
            seen[hook.name] = x

        def write(out, hook):
            t = next(t for t in tcs if t.hook_name_out == hook.name)
            new = t.b_dec + t.skip(seen[t.hook_name])
            new = new.expand_as(out).clone()
            new[:, 0] += first[t.layer]
            return new

        fwd = [(s, lambda x, hook: real[hook.name]) for s in frozen]
        fwd += [("hook_embed", lambda x, hook: torch.zeros_like(x))]
        fwd += [(t.hook_name, read) for t in tcs] + [(t.hook_name_out, write) for t in tcs]
        with model.hooks(fwd):
            resid_final = model(tokens[None], stop_at_layer=n)
            final = model.ln_final(resid_final)
    return {t.layer: seen[t.hook_name][0] for t in tcs}, final[0], real


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("read", ["ln2.hook_normalized", "hook_resid_mid"])
def test_completeness_every_node_is_its_edges_plus_its_biases(cfg, read):
    model = random_model(cfg)
    tcs = random_transcoders(model, read=read)
    tokens = torch.randint(0, cfg.d_vocab, (9,), generator=torch.Generator().manual_seed(2))
    g = attribute(model, tcs, tokens, batch_size=32, max_n_logits=5, desired_logit_prob=0.99)
    assert g.n_features > 50 and not model.has_hooks()
    zero_x, zero_final, real = zero_source_run(model, tcs, tokens)
    # features: pre-activation = edges in + (its input at zero sources) @ W_enc + b_enc
    errs = []
    for i, (layer, pos, f) in enumerate(g.active_features.tolist()):
        t = tcs[layer]
        pre = real[t.hook_name][0, pos] @ t.W_enc[:, f] + t.b_enc[f]
        bias = zero_x[layer][pos] @ t.W_enc[:, f] + t.b_enc[f]
        got = g.adjacency[i].sum() + bias
        errs.append(float((got - pre).abs() / pre.abs().clamp(min=1)))
    # logits: the demeaned logit = edges in + its value at zero sources; the logits of the
    # real model are recovered exactly (the error nodes close the gap)
    logits = model(tokens[None])[0, -1]
    ids, _, vecs = logit_targets(logits, model.W_U, 5, 0.99)
    demeaned = logits[ids] - (model.W_U.mean(1) @ model.ln_final(real_final(model, tokens)))
    for k in range(g.n_logits):
        got = g.adjacency[g.logit_index(k)].sum() + zero_final[-1] @ vecs[k]
        errs.append(float((got - demeaned[k]).abs() / demeaned[k].abs().clamp(min=1)))
    assert max(errs) < 1e-4, max(errs)
    # no edge runs backwards: a feature is only fed by earlier layers and positions
    for i, (layer, pos, _) in enumerate(g.active_features.tolist()[:20]):
        row = g.adjacency[i]
        for j in row.nonzero()[:, 0].tolist():
            n = g.node(j)
            assert n["pos"] <= pos and n["layer"] < layer, (g.node(i), n)


def real_final(model, tokens):
    with torch.no_grad():
        return model(tokens[None], stop_at_layer=model.cfg.n_layers)[0, -1]


def test_errors_make_the_replacement_exact_and_splicing_keeps_logits():
    model = random_model(GPT2)
    tcs = random_transcoders(model)
    tokens = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(tokens)
        with model.saes(tcs):
            spliced, cache = model.run_with_cache(tokens)
        without = model.run_with_saes(tokens, tcs, use_error_term=False)
    assert torch.equal(plain, spliced)  # the error term makes it exact
    x = cache["blocks.1.ln2.hook_normalized"]
    acts = cache["blocks.1.ln2.hook_normalized.transcoder.hook_acts"]
    assert torch.allclose(acts, torch.relu(x @ tcs[1].W_enc + tcs[1].b_enc), atol=1e-6)
    err = cache["blocks.1.ln2.hook_normalized.transcoder.hook_error"]
    recons = acts @ tcs[1].W_dec + tcs[1].b_dec + x @ tcs[1].W_skip
    assert torch.allclose(err, cache["blocks.1.hook_mlp_out"] - recons, atol=1e-5)
    assert (without - plain).abs().max() > 1e-2  # without it, the transcoders' own model
    assert not model.has_hooks()


def test_pruning_keeps_tokens_and_logits_and_the_folder_is_circuit_tracer_json(tmp_path):
    model = random_model(GPT2)
    tcs = random_transcoders(model)
    g = attribute(model, tcs, torch.arange(3, 11), batch_size=64)
    nodes, edges, scores = g.prune(0.8, 0.98)
    assert nodes[g.token_offset :].all() and scores.max() <= 1 + 1e-6
    assert not edges[~nodes].any() and not edges[:, ~nodes].any()
    out = g.save(tmp_path / "g", slug="toy")
    data = json.loads((out / "graph.json").read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert sum(n["feature_type"] == "logit" for n in data["nodes"]) == g.n_logits
    with pytest.raises(ValueError, match="supernodes"):
        g.save(tmp_path / "g", supernodes=[["x", "no_such_node"]])


def test_bad_input_is_a_clear_error_and_nothing_stays_attached():
    model = random_model(GPT2)
    tcs = random_transcoders(model)
    other = random_transcoders(random_model(LLAMA), d_sae=8)
    with pytest.raises(SAEError, match="one transcoder per layer"):
        attribute(model, tcs[:2], torch.arange(5))
    wide = Transcoder(TranscoderConfig(d_in=16, d_sae=8, d_out=16,
                      hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out"))  # fmt: skip
    with pytest.raises(SAEError, match="another model"):
        attribute(model, [wide, *tcs[1:]], torch.arange(5))
    with pytest.raises(ValueError, match="n_ctx"):
        attribute(model, tcs, torch.arange(30) % 60)
    with pytest.raises(SAEError):
        with model.saes([wide]):
            pass
    assert other and not model.has_hooks()
    with pytest.raises(SAEError, match="input site"):
        TranscoderConfig(d_in=4, d_sae=4, d_out=4, hook_name="blocks.0.hook_resid_pre",
                         hook_name_out="blocks.0.hook_mlp_out")  # fmt: skip


def test_max_feature_nodes_keeps_the_most_influential():
    model = random_model(GPT2)
    tcs = random_transcoders(model)
    full = attribute(model, tcs, torch.arange(3, 11), batch_size=64)
    part = attribute(model, tcs, torch.arange(3, 11), batch_size=16, max_feature_nodes=40)
    assert part.n_features == 40
    index = {tuple(f): i for i, f in enumerate(full.active_features.tolist())}
    rows = [index[tuple(f)] for f in part.active_features.tolist()]
    cols = rows + list(range(full.n_features, full.adjacency.shape[0]))
    want = full.adjacency[rows][:, cols]
    assert torch.allclose(part.adjacency[:40], want, atol=1e-5)


@pytest.mark.skipif(not (DATA / "reference.pt").exists(), reason="no circuit-tracer fixture")
def test_adjacency_equals_circuit_tracers():
    ref = torch.load(DATA / "reference.pt", weights_only=True)
    model = resid.load(DATA / "model", device="cpu")
    tcs = load_transcoders(DATA / "transcoders")
    g = attribute(model, tcs, ref["tokens"], batch_size=64, max_n_logits=int(ref["max_n_logits"]),
                  desired_logit_prob=float(ref["desired_logit_prob"]))  # fmt: skip
    assert torch.equal(g.active_features, ref["active_features"])
    assert torch.equal(g.logit_tokens, ref["logit_tokens"])
    scale = ref["adjacency"].abs().max()
    delta = (g.adjacency - ref["adjacency"]).abs().max()
    print(f"max |Δ| vs circuit-tracer: {delta:.3g} (largest edge {scale:.3g})")
    assert delta <= 1e-4
