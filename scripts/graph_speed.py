"""Time ``resid.graphs.attribute`` on a random model of SmolLM2-135M's shapes (30 layers,
d_model 576, 9 query / 3 key-value heads, d_mlp 1536, vocabulary 49152) with random
transcoders of 4 * d_model features, on a 16-token prompt: seconds and peak memory.

    python scripts/graph_speed.py [N_LAYERS] [BATCH_SIZE]

Or the model, transcoders and prompt that ``scripts/make_graph_fixtures.py --time`` timed
circuit-tracer on (``--folder /tmp/ct-timing-12-576``): the same inputs for both. The transcoders are about 0.6 % active (about 14
features per token and layer), roughly the density of trained ones.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

import resid
from resid.core.config import Config
from resid.graphs import attribute
from resid.sae import Transcoder, TranscoderConfig


def transcoders(cfg: Config, seed: int = 0) -> list[Transcoder]:
    gen = torch.Generator().manual_seed(seed)
    d, n = cfg.d_model, 4 * cfg.d_model
    out = []
    for layer in range(cfg.n_layers):
        tc = Transcoder(TranscoderConfig(d_in=d, d_sae=n, d_out=d,
                        hook_name=f"blocks.{layer}.ln2.hook_normalized",
                        hook_name_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, n, generator=gen) / d**0.5)
            tc.b_enc.fill_(-2.5)
            tc.W_dec.copy_(torch.randn(n, d, generator=gen) / d**0.5 * 0.1)
        out.append(tc)
    return out


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--folder":
        import json
        from pathlib import Path

        from resid.sae import load_transcoders

        folder = Path(args[1])
        batch = int(args[2]) if len(args) > 2 else 256
        model = resid.load(folder / "model", device="cpu")
        tcs = load_transcoders(folder / "transcoders")
        tokens = torch.tensor(json.loads((folder / "tokens.json").read_text()))
        return timed(model, tcs, tokens, batch)
    else:
        n_layers = int(args[0]) if args else 30
        batch = int(args[1]) if len(args) > 1 else 128
        cfg = Config(n_layers=n_layers, n_heads=9, n_kv_heads=3, d_model=576, d_head=64,
                     d_mlp=1536, d_vocab=49152, n_ctx=2048, normalization="RMS",
                     positional="rotary", act_fn="silu", gated_mlp=True, attn_bias=False,
                     attn_out_bias=False, mlp_bias=False, layer_norm_eps=1e-5)  # fmt: skip
    torch.manual_seed(0)
    model = resid.Model(cfg)
    model.init_weights()
    model.eval()
    tcs = transcoders(cfg)
    tokens = torch.randint(1, cfg.d_vocab, (16,), generator=torch.Generator().manual_seed(1))
    timed(model, tcs, tokens, batch)


def timed(model, tcs, tokens, batch: int) -> None:
    cfg = model.cfg
    start = time.perf_counter()
    g = attribute(model, tcs, tokens, batch_size=batch)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"resid: {cfg.n_layers} layers, d_model {cfg.d_model}, 16 tokens, "
          f"{g.n_features} features, {g.n_logits} logits, batch {batch}: {took:.1f} s, "
          f"peak RSS {peak:.0f} MiB, {torch.get_num_threads()} thread(s)")  # fmt: skip


if __name__ == "__main__":
    main()
