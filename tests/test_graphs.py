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
        errs.append(float(((got - pre).abs() / pre.abs().clamp(min=1)).detach()))
    # logits: the demeaned logit = edges in + its value at zero sources; the logits of the
    # real model are recovered exactly (the error nodes close the gap)
    logits = model(tokens[None])[0, -1]
    ids, _, vecs = logit_targets(logits, model.W_U, 5, 0.99)
    demeaned = logits[ids] - (model.W_U.mean(1) @ model.ln_final(real_final(model, tokens)))
    for k in range(g.n_logits):
        got = g.adjacency[g.logit_index(k)].sum() + zero_final[-1] @ vecs[k]
        errs.append(float(((got - demeaned[k]).abs() / demeaned[k].abs().clamp(min=1)).detach()))
    print(f"completeness: max relative error {max(errs):.2g} over {len(errs)} nodes")
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
    with torch.no_grad():  # a caller's no_grad does not stop the backward passes
        again = attribute(model, tcs, torch.arange(3, 11), batch_size=7)
    assert torch.allclose(again.adjacency, g.adjacency, atol=1e-6)
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


@pytest.fixture(scope="module")
def cli_graph(tmp_path_factory):
    """``resid graph`` on the fixture model and transcoders, with a harvest of the
    transcoders' features and a supernode file."""
    from resid.cli import main
    from resid.harvest.run import harvest

    tmp = tmp_path_factory.mktemp("cli")
    model = resid.load(DATA / "model", device="cpu")
    tcs = load_transcoders(DATA / "transcoders")
    corpus = tmp / "corpus.txt"
    gen = torch.Generator().manual_seed(5)
    corpus.write_text("\n".join(" ".join(f"w{int(i)}" for i in torch.randint(1, 500, (40,), generator=gen))
                                for _ in range(12)))  # fmt: skip
    sites = [t.name_of("hook_acts") for t in tcs]
    with model.saes(tcs):
        harvest(model, corpus, tmp / "harvest", sites, context_length=32, progress=False, k=4)
    prompt = "w17 w203 w45 w99 w311 w7"
    first = main(["graph", str(DATA / "model"), prompt, "--transcoders", str(DATA / "transcoders"),
                  "--out", str(tmp / "g0"), "--device", "cpu"])  # fmt: skip
    data = json.loads((tmp / "g0" / "graph.json").read_text())
    feats = [n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    (tmp / "groups.json").write_text(json.dumps([["first two", *feats[:2]]]))
    code = main(["graph", str(DATA / "model"), prompt, "--transcoders", str(DATA / "transcoders"),
                 "--out", str(tmp / "g"), "--harvest", str(tmp / "harvest"), "--device", "cpu",
                 "--supernodes", str(tmp / "groups.json")])  # fmt: skip
    return tmp, first, code, feats


def test_cli_writes_the_graph_page_supernodes_and_contexts(cli_graph):
    tmp, first, code, feats = cli_graph
    assert first == 0 and code == 0 and len(feats) >= 2
    out = tmp / "g"
    names = {p.name for p in out.iterdir()}
    assert {"graph.json", "supernodes.json", "index.html", "resid-manifest.json"} <= names
    data = json.loads((out / "graph.json").read_text())
    assert data["qParams"]["supernodes"] == [["first two", *feats[:2]]]
    assert json.loads((out / "supernodes.json").read_text()) == [["first two", *feats[:2]]]
    page = (out / "index.html").read_text()
    assert "<script src" not in page and "<link" not in page  # offline: nothing to fetch
    assert '"contexts": {"' in page  # the harvest's top contexts are in the page


def test_cli_bad_input_is_a_clear_error(cli_graph, tmp_path, capsys):
    from resid.cli import main

    base = ["graph", str(DATA / "model"), "w17 w203", "--device", "cpu"]
    assert main([*base, "--transcoders", str(DATA / "transcoders"), "--out", str(tmp_path / "a"),
                 "--harvest", str(tmp_path / "no-harvest")]) == 2  # fmt: skip
    assert "harvest" in capsys.readouterr().err
    assert main([*base, "--transcoders", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "transcoders" in capsys.readouterr().err
    long = " ".join(["w5"] * 70)  # the fixture model's context is 64 tokens
    assert main(["graph", str(DATA / "model"), long, "--device", "cpu", "--transcoders",
                 str(DATA / "transcoders"), "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "n_ctx" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.skipif(
    __import__("shutil").which("chromium") is None
    and __import__("shutil").which("chromium-browser") is None,
    reason="Chromium not found on PATH",
)
def test_graph_page_draws_offline_in_a_browser(cli_graph):
    import chromium

    tmp, *_ = cli_graph
    probe = """(() => {
        const first = document.querySelector('circle.node');
        first.dispatchEvent(new MouseEvent('click', {bubbles: true}));
        const feat = Array.from(document.querySelectorAll('circle.node')).find(
            c => D.contexts[c.dataset.id]);
        if (feat) feat.dispatchEvent(new MouseEvent('click', {bubbles: true}));
        return JSON.stringify({nodes: document.querySelectorAll('circle.node').length,
            edges: document.querySelectorAll('line').length,
            groups: document.querySelectorAll('rect.group').length,
            contexts: document.querySelectorAll('#info .ctx').length});
    })()"""
    load = chromium.load((tmp / "g" / "index.html").as_uri(), probe)
    assert load.errors == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in load.requests), load.requests
    state = json.loads(load.value)
    data = json.loads((tmp / "g" / "graph.json").read_text())
    assert state["nodes"] == len(data["nodes"]) and state["edges"] == len(data["links"])
    assert state["groups"] == 1 and state["contexts"] > 0
    assert chromium.png_pixels(load.screenshot)[..., :3].std() > 20


def test_interventions_in_the_replacement_model_are_what_the_graph_predicts():
    from resid.graphs.steering import effects, intervene

    model = random_model(GPT2)
    tcs = random_transcoders(model)
    for t in tcs:  # sparser features: fewer cross their threshold when one moves
        with torch.no_grad():
            t.b_enc.sub_(1.0)
    tokens = torch.arange(3, 12)
    g = attribute(model, tcs, tokens, batch_size=64, max_n_logits=3, desired_logit_prob=0.99)
    _, _, scores = g.prune()
    top = scores[: g.n_features].argsort()[:8].tolist()
    # a small change crosses no ReLU threshold: the graph's prediction is exact
    pred, act = effects(model, tcs, g, [[i] for i in top], scale=0.9, mode="replacement")
    assert torch.allclose(pred, act, atol=1e-4, rtol=1e-3), (pred, act)
    assert act.abs().max() > 1e-2
    # ablation may wake features the graph does not have: close, not exact
    pred, act = effects(model, tcs, g, [[i] for i in top], scale=0.0, mode="replacement")
    assert torch.corrcoef(torch.stack([pred.flatten(), act.flatten()]))[0, 1] > 0.99
    # scale 1 changes nothing, in every mode; the real model's change is a real change
    for mode in ("real", "frozen_attention", "replacement"):
        same = intervene(model, tcs, tokens, [tuple(g.active_features[top[0]].tolist())], 1.0, mode)
        assert torch.allclose(same, model(tokens[None])[0], atol=1e-4), mode
    real = intervene(model, tcs, tokens, [tuple(g.active_features[top[0]].tolist())], 0.0)
    assert (real - model(tokens[None])[0]).abs().max() > 1e-4 and not model.has_hooks()
    with pytest.raises(ValueError, match="no feature"):
        intervene(model, tcs, tokens, [(0, 99, 0)])


@pytest.mark.skipif(not (DATA / "frontend").exists(), reason="no circuit-tracer fixture")
def test_pruned_json_equals_circuit_tracers_frontend_file():
    ref = torch.load(DATA / "reference.pt", weights_only=True)
    theirs = json.loads((DATA / "frontend" / "fixture.json").read_text())
    model = resid.load(DATA / "model", device="cpu")
    g = attribute(model, load_transcoders(DATA / "transcoders"), ref["tokens"],
                  max_n_logits=int(ref["max_n_logits"]),
                  desired_logit_prob=float(ref["desired_logit_prob"]))  # fmt: skip
    ours = g.to_json("fixture", node_threshold=0.8, edge_threshold=0.98)
    nodes = {n["node_id"]: n for n in ours["nodes"]}
    want = {n["node_id"]: n for n in theirs["nodes"]}
    assert set(nodes) == set(want)  # the same nodes survive pruning
    for nid, n in want.items():
        assert set(nodes[nid]) == set(n), nid  # the same fields, as its frontend reads them
        for key in ("feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "is_target_logit"):
            assert nodes[nid][key] == n[key], (nid, key)
        if n["influence"] is not None:
            assert abs(nodes[nid]["influence"] - n["influence"]) < 1e-5
    links = {(x["source"], x["target"]): x["weight"] for x in ours["links"]}
    theirs_links = {(x["source"], x["target"]): x["weight"] for x in theirs["links"]}
    assert set(links) == set(theirs_links)
    assert max(abs(links[k] - w) for k, w in theirs_links.items()) < 1e-4
