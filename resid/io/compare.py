"""Logit parity of a checkpoint in resid against the reference implementations installed.

References: Hugging Face ``transformers`` (eager and sdpa attention) and TransformerLens'
``TransformerBridge``, each given the same checkpoint and the same token ids. For every
reference: max and mean |Δ logit|, top-1 agreement and KL(reference ‖ resid); against
TransformerLens also the max |Δ| at every hook site both have.

>>> report = compare("path/to/gpt2-folder")
>>> print(format_report(report)); report.ok
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from dataclasses import dataclass, field

import torch
from torch import Tensor

from resid.core import names
from resid.core.model import Model
from resid.io.gguf import load_gguf
from resid.io.loading import build, read
from resid.io.references import hf_gguf_reference, hf_reference, transformer_lens_bridge

DEFAULT_PROMPTS = [
    "Hello world, the Eiffel Tower is in",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    return",
]


@dataclass
class Row:
    reference: str
    max_abs: float
    mean_abs: float
    top1: float
    kl: float
    ok: bool


@dataclass
class Report:
    source: str
    dtype: torch.dtype
    device: str
    n_tokens: int
    tolerance: str
    rows: list[Row] = field(default_factory=list)
    sites: dict[str, float] = field(default_factory=dict)  # hook name -> max |Δ| vs TransformerLens
    sites_ok: bool = True
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and self.sites_ok


def tolerance(dtype: torch.dtype, n_layers: int = 12) -> tuple[float, float]:
    """(atol, rtol) for a pass: max |Δ logit| ≤ atol + rtol · max |reference logit|.

    For float32 and float64, float32 rounding: (1e-4, 1e-5). For half types the bound is
    derived from the format's machine epsilon ε (``torch.finfo(dtype).eps``: 2⁻⁷ ≈ 0.0078
    for bfloat16, 2⁻¹⁰ for float16). One unit in the last place of a logit x is at most
    ε·|x|, so two implementations that each round their logits can differ by one ulp at
    the logit scale, ε·max|logit|. Before that, each of the 2·n_layers residual updates is
    rounded to the dtype; the unembedding carries those errors to the logits at the same
    scale, and independent roundings add like a random walk: √(2·n_layers) ulps. Hence
    rtol = ε·(1 + √(2·n_layers)) and atol = ε (an ulp of a logit of 1, for tiny logits).
    For GPT-2 small in bfloat16 that is rtol = 0.0078·(1 + √24) ≈ 0.046: about 0.5 logit
    at a logit scale of 10, 4.6 logits at GPT-2's scale of about 100 (where one bfloat16
    ulp is already 0.5).
    """
    if dtype in (torch.float32, torch.float64):
        return 1e-4, 1e-5
    eps = torch.finfo(dtype).eps
    return eps, eps * (1 + math.sqrt(2 * n_layers))


def logit_stats(name: str, ref: Tensor, ours: Tensor, atol: float, rtol: float) -> Row:
    ref, ours = ref.double(), ours.double()
    diff = (ref - ours).abs()
    logp_ref, logp = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == ours.argmax(-1)).double().mean().item()
    max_abs = diff.max().item()
    return Row(
        name, max_abs, diff.mean().item(), top1, kl, max_abs <= atol + rtol * ref.abs().max().item()
    )


def site_diff(ours: Tensor, ref: Tensor) -> float:
    """Max |Δ| over finite entries; masked attention scores must be masked in both."""
    ours, ref = ours.double(), ref.double()
    masked_ours, masked_ref = ours < -1e30, ref < -1e30  # -inf, or the dtype's minimum
    if not torch.equal(masked_ours, masked_ref):
        return float("inf")
    keep = ~masked_ours
    return (ours[keep] - ref[keep]).abs().max().item() if keep.any() else 0.0


@torch.inference_mode()
def compare(
    source: str,
    prompts: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Report:
    """Load ``source`` into resid and into every installed reference; compare their logits."""
    gguf = str(source).endswith(".gguf")  # each library reads a GGUF file itself
    ckpt = None if gguf else read(source)  # read once: the references get the same tensors
    model: Model = (
        load_gguf(source, dtype, device) if gguf else build(ckpt, device=device, dtype=dtype)
    )
    device = str(model.device)
    tokens = model.to_tokens(prompts or DEFAULT_PROMPTS)
    ours = model(tokens)
    atol, rtol = tolerance(dtype, model.cfg.n_layers)
    derived = (
        ""
        if dtype in (torch.float32, torch.float64)
        else f"  (ε = {torch.finfo(dtype).eps:g}; rtol = ε·(1 + √(2·{model.cfg.n_layers})))"
    )
    report = Report(
        source,
        dtype,
        device,
        tokens.numel(),
        f"max|Δ| ≤ {atol:.3g} + {rtol:.3g}·max|logit|{derived}",
    )
    if importlib.util.find_spec("transformers") is None:
        report.skipped.append("transformers (pip install 'resid[compare]')")
        return report
    if gguf:
        hf = hf_gguf_reference(source, device, dtype)
    else:
        hf = hf_reference(source, model.cfg, device, dtype, weights=ckpt.weights)
    for attn in ("eager", "sdpa"):
        hf.set_attn_implementation(attn)
        ref = hf(tokens).logits
        report.rows.append(logit_stats(f"transformers ({attn})", ref, ours, atol, rtol))
    if importlib.util.find_spec("transformer_lens") is None:
        report.skipped.append("transformer_lens (pip install 'resid[compare]')")
        return report
    # the bridge wraps the HF model it is given in place, so it gets that one, last
    gpt2 = model.cfg.architecture == "gpt2"
    if gguf and not gpt2:  # a GGUF has no config.json: the bridge reads transformers' config
        with tempfile.TemporaryDirectory(prefix="resid-compare-") as config:
            hf.config.save_pretrained(config)
            bridge = transformer_lens_bridge(hf, device, copy=False, config_from=config)
    elif not gpt2 and not (ckpt.folder and (ckpt.folder / "config.json").is_file()):
        report.skipped.append("TransformerLens bridge (it needs the checkpoint's config.json)")
        return report
    else:
        config_from = "gpt2" if gpt2 else str(ckpt.folder)
        bridge = transformer_lens_bridge(hf, device, copy=False, config_from=config_from)
    report.rows.append(logit_stats("TransformerLens bridge", bridge(tokens), ours, atol, rtol))
    # hook_result and the split inputs are off in the bridge unless enabled (asked for, it
    # warns and skips them): compare every site it caches by default
    left_out = {"result", "attn_in", "q_input", "k_input", "v_input", "mlp_in"}
    if model.cfg.architecture == "gpt_neo":  # the bridge's GPT-Neo scores hold the pattern
        left_out.add("attn_scores")
    shared = [
        n
        for n in model.hook_names
        if n in bridge.hook_dict and names.site_info(n).short not in left_out
    ]
    _, tl_cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in shared)
    _, cache = model.run_with_cache(tokens, names_filter=shared)
    report.sites = {
        n: site_diff(cache[n], tl_cache[n])
        for n in shared
        if n in tl_cache and tl_cache[n].shape == cache[n].shape
    }
    report.sites_ok = all(d <= atol + rtol * tl_cache[n].abs().nan_to_num(posinf=0, neginf=0).max().item()
                          for n, d in report.sites.items())  # fmt: skip
    return report


def format_report(report: Report) -> str:
    lines = [
        f"resid compare: {report.source}  ({report.n_tokens} tokens, {report.dtype}, {report.device})",
        f"tolerance: {report.tolerance}",
        "",
        f"{'reference':<26}{'max |Δ logit|':>15}{'mean |Δ|':>12}{'top-1 agree':>13}{'KL(ref‖resid)':>15}  ",
    ]
    for r in report.rows:
        lines.append(
            f"{r.reference:<26}{r.max_abs:>15.3e}{r.mean_abs:>12.3e}{r.top1:>13.2%}{r.kl:>15.3e}  "
            + ("ok" if r.ok else "BEYOND TOLERANCE")
        )
    if report.sites:
        worst = max(report.sites, key=report.sites.get)
        lines += ["", f"hook sites vs TransformerLens ({len(report.sites)} shared; worst {worst}):"]
        groups: dict[str, float] = {}
        for name, d in report.sites.items():
            key = names.site_info(name).path  # one row per site, over every layer
            groups[key] = max(groups.get(key, 0.0), d)
        lines += [f"  {k:<28}{v:>12.3e}" for k, v in groups.items()]
        lines.append("  all sites ok" if report.sites_ok else "  SOME SITES BEYOND TOLERANCE")
    for s in report.skipped:
        lines.append(f"skipped: {s} is not installed")
    return "\n".join(lines)
