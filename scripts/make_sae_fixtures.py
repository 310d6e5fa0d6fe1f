"""Write the SAELens reference fixtures that ``tests/test_sae.py`` checks resid against.

SAELens (``sae-lens``) needs ``transformer-lens < 4``, so it cannot share resid's
environment (TransformerLens 4.3). Build the reference in a virtual environment of its
own, outside the repository, and run this script there:

    python -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0                  # CPU build first
    /tmp/saelens-venv/bin/pip install torch==2.13.0 'transformer-lens==3.9.0' sae-lens
    /tmp/saelens-venv/bin/python scripts/make_sae_fixtures.py        # from the repo root

(the committed fixtures were made with sae-lens 6.54.12, transformer-lens 3.9.0 and torch
2.13.0). For each architecture (standard, top-k, JumpReLU, gated) and a few input
normalisations it builds a small SAE with random weights (``d_in`` 16, ``d_sae`` 64, so
that the whole folder stays at tens of KB), saves it with SAELens' own ``save_model``
(``cfg.json`` + ``sae_weights.safetensors``) and writes ``expected.safetensors`` beside it:
fixed inputs ``x`` and SAELens' outputs on them, ``acts_pre`` (``hook_sae_acts_pre``),
``acts`` (``encode``) and ``recons`` (``decode(encode(x))``).

Only SAELens runs here; resid is not imported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    __version__,
)
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sae"
D_IN, D_SAE = 16, 64

# name -> (SAE class, config class, extra config)
CASES = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "standard_layer_norm": (
        StandardSAE,
        StandardSAEConfig,
        {"normalize_activations": "layer_norm", "apply_b_dec_to_input": False},
    ),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 8}),
    "topk_rescaled": (
        TopKSAE,
        TopKSAEConfig,
        {
            "k": 5,
            "rescale_acts_by_decoder_norm": True,
            "normalize_activations": "constant_norm_rescale",
        },
    ),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {"apply_b_dec_to_input": False}),
}


def randomise(sae, g: torch.Generator) -> None:
    """Random weights of a sensible size: a few features fire on the random inputs."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("W_"):
                p.copy_(torch.randn(p.shape, generator=g) / D_IN**0.5)
            elif name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:  # biases, r_mag
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, D_IN, generator=g)  # [batch, pos, d_in]: shared by every case
    for name, (sae_cls, cfg_cls, extra) in CASES.items():
        cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra)
        cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
        cfg.metadata.model_name = "fixture"
        sae = sae_cls(cfg)
        randomise(sae, g)
        folder = OUT / name
        sae.save_model(folder)
        with torch.no_grad():
            _, cache = sae.run_with_cache(x)
            acts = sae.encode(x)
            recons = sae.decode(acts)
        expected = {
            "x": x,
            "acts_pre": cache["hook_sae_acts_pre"],
            "acts": acts,
            "recons": recons,
        }
        assert torch.equal(cache["hook_sae_acts_post"], acts)
        save_file({k: v.contiguous() for k, v in expected.items()}, folder / "expected.safetensors")
        l0 = (acts > 0).float().sum(-1).mean().item()
        print(
            f"{name:>20}: mean L0 {l0:.1f}, cfg {json.loads((folder / 'cfg.json').read_text())['architecture']}"
        )
    (OUT / "VERSIONS").write_text(f"sae-lens {__version__}\ntorch {torch.__version__}\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
