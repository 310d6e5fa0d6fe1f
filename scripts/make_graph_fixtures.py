"""Write tests/data/graphs/: an attribution graph computed by circuit-tracer, the peer that
tests/test_graphs.py::test_adjacency_equals_circuit_tracers compares resid against.

What it writes (a few hundred kB): ``model/`` (a small GPT-2-shaped model from a seeded
random config, saved by transformers as safetensors, with a word-level tokenizer),
``transcoders/`` (seeded random skip transcoders in circuit-tracer's format: config.yaml
and layer_{i}.safetensors, reading ``ln2.hook_normalized`` and writing ``hook_mlp_out``),
``reference.pt`` (the prompt's token ids and circuit-tracer's graph: active features,
logit tokens and probabilities, and the dense adjacency matrix) and
``frontend/fixture.json`` (its pruned graph as its frontend reads it), made by
``circuit_tracer.attribute`` on the TransformerLens backend, the model built from a
``HookedTransformerConfig`` written here and TransformerLens' own GPT-2 weight conversion
(no hub access).

Regenerate, in a separate environment (resid's dev dependencies are not needed, and
circuit-tracer's are not resid's)::

    python -m venv /tmp/ctvenv && /tmp/ctvenv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0
    /tmp/ctvenv/bin/python scripts/make_graph_fixtures.py [OUT]   # OUT: tests/data/graphs

``--time`` instead times circuit-tracer's attribute on the same kind of inputs (a larger
model: ``--time LAYERS D_MODEL``, saved under /tmp/ct-timing-LAYERS-D_MODEL with the
prompt, for ``scripts/graph_speed.py --folder`` to time resid on the same inputs) and
prints seconds and peak memory.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

SEED = 0
N_LAYERS, D_MODEL, N_HEADS, VOCAB, D_SAE = 3, 64, 4, 512, 128
PROMPT = [0, 17, 203, 45, 99, 311, 7, 480, 260, 58]
MAX_N_LOGITS, DESIRED_LOGIT_PROB = 8, 0.95


def tokenizer(folder: Path, vocab: int):
    """A word-level tokenizer of ``vocab`` words (``<s>`` is id 0, a special token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>"] + [f"w{i}" for i in range(1, vocab - 1)] + ["<unk>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    tok.save_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))  # with the name TransformerLens wants


def build(
    n_layers: int,
    d_model: int,
    n_heads: int,
    vocab: int,
    d_sae: int,
    folder: Path,
    enc_scale: float = 2.0,
):
    """(TransformerLens replacement model, transcoder set) of a seeded random GPT-2-shaped
    model saved under ``folder/model`` and transcoders under ``folder/transcoders``."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.single_layer_transcoder import (
        TranscoderSet,
        load_relu_transcoder,
    )
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=d_model,
                                    n_layer=n_layers, n_head=n_heads, bos_token_id=0,
                                    eos_token_id=0)).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in hf.named_parameters():
            gain = p.dim() == 1 and "ln" in name and name.endswith("weight")
            p.normal_(1.0 if gain else 0.0, 0.1 if p.dim() == 1 else 0.3 / d_model**0.25)
    (folder / "model").mkdir(parents=True)
    hf.save_pretrained(str(folder / "model"), safe_serialization=True)
    tok = tokenizer(folder / "model", vocab)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=vocab, n_ctx=64, act_fn="gelu_new", normalization_type="LN",
        eps=1e-5, positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, model_name="resid-fixture", tokenizer_name=None,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    state = convert_gpt2_weights(hf, cfg)
    tc_dir = folder / "transcoders"
    tc_dir.mkdir()
    from safetensors.torch import save_file

    paths = []
    gen = torch.Generator().manual_seed(SEED + 1)
    for layer in range(n_layers):
        scale = d_model**-0.5
        tensors = {
            "W_enc": torch.randn(d_sae, d_model, generator=gen) * enc_scale * scale,
            "W_dec": torch.randn(d_sae, d_model, generator=gen) * scale,
            "b_enc": torch.randn(d_sae, generator=gen) * 0.3 - 2.5,  # sparse: a few % active
            "b_dec": torch.randn(d_model, generator=gen) * 0.1,
            "W_skip": torch.randn(d_model, d_model, generator=gen) * 0.3 * scale,
        }
        path = tc_dir / f"layer_{layer}.safetensors"
        save_file(tensors, str(path))
        paths.append(path.name)
    (tc_dir / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
        "feature_output_hook: hook_mlp_out\ntranscoders:\n" + "".join(f"- {p}\n" for p in paths)
    )
    tcs = {i: load_relu_transcoder(str(tc_dir / p), i, device=torch.device("cpu"),
                                   lazy_encoder=False, lazy_decoder=False)
           for i, p in enumerate(paths)}  # fmt: skip
    tset = TranscoderSet(tcs, feature_input_hook="ln2.hook_normalized",
                         feature_output_hook="hook_mlp_out", scan="resid-fixture")  # fmt: skip
    model = TransformerLensReplacementModel(cfg, tokenizer=tok)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)  # fmt: skip
    model._configure_replacement_model(tset)
    return model, hf


def main(out: Path) -> None:
    from circuit_tracer import attribute

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model, hf = build(N_LAYERS, D_MODEL, N_HEADS, VOCAB, D_SAE, tmp)
    tokens = torch.tensor(PROMPT)
    with torch.no_grad():  # the TransformerLens model is the transformers one
        diff = (model(tokens[None]) - hf(tokens[None]).logits).abs().max()
    assert diff < 1e-4, diff
    graph = attribute(tokens, model, max_n_logits=MAX_N_LOGITS,
                      desired_logit_prob=DESIRED_LOGIT_PROB, batch_size=64)  # fmt: skip
    ref = {
        "tokens": tokens,
        "active_features": graph.active_features.long(),
        "activations": graph.activation_values.float(),
        "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
        "logit_probabilities": graph.logit_probabilities.float(),
        "adjacency": graph.adjacency_matrix.float().contiguous(),
        "max_n_logits": torch.tensor(MAX_N_LOGITS),
        "desired_logit_prob": torch.tensor(DESIRED_LOGIT_PROB),
    }
    torch.save(ref, tmp / "reference.pt")
    # circuit-tracer's own pruned frontend JSON of the same graph
    from circuit_tracer.utils.create_graph_files import create_graph_files

    graph.cfg.tokenizer_name = str(tmp / "model")
    create_graph_files(graph, slug="fixture", output_path=str(tmp / "frontend"),
                       scan="resid-fixture", node_threshold=0.8, edge_threshold=0.98)  # fmt: skip
    for extra in (tmp / "frontend").iterdir():  # keep the graph, not the index it adds
        if extra.name != "fixture.json":
            extra.unlink()
    (tmp / "README.md").write_text(
        "Made by scripts/make_graph_fixtures.py (circuit-tracer 0.5.0, TransformerLens backend); "
        "see its docstring to regenerate.\n"
        + json.dumps(
            {
                "n_features": len(graph.active_features),
                "adjacency": list(graph.adjacency_matrix.shape),
            }
        )
        + "\n"  # fmt: skip
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out}: {len(graph.active_features)} features, adjacency "
          f"{tuple(graph.adjacency_matrix.shape)}")  # fmt: skip


def timing(n_layers: int, d_model: int, n_pos: int = 16) -> None:
    """circuit-tracer's attribute on a random GPT-2-shaped model of this size with
    4 * d_model-feature transcoders: seconds and peak resident memory."""
    from circuit_tracer import attribute

    tmp = Path(f"/tmp/ct-timing-{n_layers}-{d_model}")
    shutil.rmtree(tmp, ignore_errors=True)
    model, _ = build(
        n_layers, d_model, max(1, d_model // 64), 49152, 4 * d_model, tmp, enc_scale=1.0
    )  # about 0.6 % of features active, as trained ones
    gen = torch.Generator().manual_seed(1)
    tokens = torch.tensor([0] + torch.randint(1, 49151, (n_pos - 1,), generator=gen).tolist())
    (tmp / "tokens.json").write_text(json.dumps(tokens.tolist()))
    start = time.perf_counter()
    graph = attribute(tokens, model, batch_size=256)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"circuit-tracer: {n_layers} layers, d_model {d_model}, {n_pos} tokens: "
          f"{len(graph.active_features)} features, {took:.1f} s, peak RSS {peak:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--time":
        timing(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main(
            Path(sys.argv[1])
            if len(sys.argv) > 1
            else Path(__file__).parent.parent / "tests/data/graphs"
        )
