"""The SAE finding of FINDINGS.md, end to end: a top-k SAE on SmolLM2-135M-Instruct's
residual stream at a middle layer, trained on English prose that every Python ships.

1. the corpus: the English prose of the standard library's ``pydoc_data/topics.py`` (the
   text of ``help("topics")``: the language reference's sections), one topic a line;
2. ``resid harvest`` (the CLI, run here as a child process) stores the stream's
   activations at ``SITE`` for every token, in contexts of 128 tokens;
3. ``scripts/train_sae.py``'s ``train`` fits the SAE on all but the last tenth of the
   contexts (BOS and each context's first token left out: their stream is an attention
   sink ~100x the norm of the rest); on the held-out tenth, :func:`held_out_fidelity`
   reports explained variance, L0, dead features and the loss with the reconstruction
   spliced in at every other token;
4. the SAE is saved in SAELens' format, its features are harvested over the corpus with
   the SAE spliced (``resid.harvest.harvest`` under ``model.saes``), and ``resid
   dashboard`` writes their pages; ``--screenshot`` also takes one with headless Chromium.

    python scripts/findings_sae.py --model PATH --out runs/findings-sae            # full size
    python scripts/findings_sae.py --model PATH --out /tmp/s --max-tokens 4096 --steps 300

Notebook 09 calls :func:`run` (a CI-sized run unless ``RESID_FINDINGS_FULL=1``).
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import resid
from resid.harvest import harvest, iter_shards, load_stats
from resid.viz.dashboard import write_dashboard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sae import train  # noqa: E402

SITE = "blocks.15.hook_resid_pre"  # the middle of 30 layers
CONTEXT = 128


def write_corpus(path: Path) -> Path:
    """``pydoc_data/topics.py``'s topics as a ``.txt`` corpus, one topic a line."""
    lines = [" ".join(text.split()) for _, text in sorted(pydoc_data.topics.topics.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def resid_cli(*args: str, timeout: float) -> None:
    """Run ``resid ARGS`` (the installed command, through ``python -m resid``)."""
    subprocess.run([sys.executable, "-m", "resid", *args], check=True, timeout=timeout)


def not_sink(rows: torch.Tensor, bos: int) -> torch.Tensor:
    """False at each context's first token and at BOS: attention sinks whose stream at
    ``SITE`` has ~100x the norm of other tokens' (the SAE neither trains nor splices there)."""
    keep = rows != bos
    keep[..., 0] = False
    return keep


@torch.no_grad()
def held_out_fidelity(model, sae, tokens: torch.Tensor, bos: int, batch: int = 4) -> dict:
    """Explained variance, L0 and dead features over the held-out contexts' tokens but the
    sinks (:func:`not_sink`), and the next-token loss with the SAE's reconstruction in place
    of the stream at every such token (the sinks keep their own)."""
    xs, losses, spliced = [], [], []

    def splice(x, hook):
        recons = sae.decode(sae.encode(x))
        return torch.where(keep[..., None], recons.to(x.dtype), x)

    for i in range(0, len(tokens), batch):
        rows = tokens[i : i + batch]
        keep = not_sink(rows, bos)
        _, cache = model.run_with_cache(rows, names_filter=[SITE])
        xs.append(cache[SITE][keep])
        losses.append(model(rows, return_type="loss", loss_per_token=True))
        spliced.append(model.run_with_hooks(rows, fwd_hooks=[(SITE, splice)], return_type="loss",
                                            loss_per_token=True))  # fmt: skip
    x = torch.cat(xs).float()
    acts = sae.encode(x)
    recons = sae.decode(acts)
    loss, loss_spliced = torch.cat(losses).mean().item(), torch.cat(spliced).mean().item()
    return {
        "explained_variance": 1 - ((x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "mean_l0": (acts > 0).float().sum(-1).mean().item(),
        "dead_features": int((~(acts > 0).any(0)).sum()),
        "loss": loss,
        "loss_spliced": loss_spliced,
        "loss_increase": loss_spliced - loss,
        "loss_increase_relative": loss_spliced / loss - 1,
    }


def run(
    model_path: str,
    out: str | Path,
    max_tokens: int = 65536,
    d_sae: int = 2304,
    k: int = 32,
    steps: int = 1500,
    batch: int = 256,
    feature_tokens: int = 16384,
    units: str = "auto",
    n_pages: int = 40,
    seed: int = 0,
    model: resid.Model | None = None,
) -> dict:
    """Corpus, harvest, training, evaluation, feature harvest and dashboard into ``out``;
    returns the numbers (also written to ``out/results.json``). A finished run in ``out``
    with the same SAE settings is not redone: its numbers are returned. ``model``: the
    model already loaded from ``model_path``, to harvest and write the dashboard in this
    process (the same functions the ``resid harvest`` and ``resid dashboard`` commands
    call) instead of two child processes that each load it.

    >>> stats = run(path, "runs/findings-sae")
    """
    out = Path(out)
    done = out / "results.json"
    if done.exists() and (out / "sae").is_dir() and (out / "dashboard").is_dir():
        old = json.loads(done.read_text())
        asked = dict(d_sae=d_sae, k=k, steps=steps, batch=batch)
        if all(old.get(key) == value for key, value in asked.items()):
            return old  # this run is done: its numbers, not a rerun
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    corpus = write_corpus(out / "corpus" / "pydoc_topics.txt")
    t0 = time.perf_counter()
    acts_dir = out / "harvest"
    if (acts_dir / "resid-manifest.json").exists():
        pass  # harvested already (the harvest itself refuses a finished folder)
    elif model is None:
        resid_cli(
            "harvest", model_path, str(corpus), "--out", str(acts_dir), "--sites", SITE,
            "--activations", "--no-stats", "--device", "cpu", "--context-length", str(CONTEXT),
            "--batch-size", "8", "--max-tokens", str(max_tokens), "--quiet", timeout=7200,
        )  # fmt: skip
    else:
        with torch.no_grad():
            harvest(model, corpus, acts_dir, [SITE], stats=False, activations=True,
                    context_length=CONTEXT, max_tokens=max_tokens, progress=False)  # fmt: skip
    times["harvest_s"] = time.perf_counter() - t0
    shards = list(iter_shards(acts_dir))
    acts = torch.cat([s[SITE] for s in shards]).float()  # [tokens, d_model]
    tokens = torch.cat([s["tokens"] for s in shards]).long()
    in_process = model is not None
    model = model if in_process else resid.load(model_path, device="cpu")
    bos = model.tokenizer.bos_token_id
    n_ctx = len(tokens) // CONTEXT
    held = max(1, n_ctx // 10)  # the last tenth of the contexts is held out
    split = (n_ctx - held) * CONTEXT
    real = not_sink(tokens[: n_ctx * CONTEXT].view(n_ctx, CONTEXT), bos).flatten()
    train_acts = acts[:split][real[:split]]
    held_tokens = tokens[split : n_ctx * CONTEXT].view(held, CONTEXT)

    t0 = time.perf_counter()
    with torch.enable_grad():
        sae = train(model, SITE, "topk", d_sae, k, steps=steps, batch=batch, data=train_acts,
                    seed=seed, log_every=max(1, steps // 5))  # fmt: skip
    times["train_s"] = time.perf_counter() - t0
    sae.cfg.metadata.update(model_name="SmolLM2-135M-Instruct", corpus="pydoc_data/topics.py")
    t0 = time.perf_counter()
    stats = held_out_fidelity(model, sae, held_tokens, bos)
    times["evaluate_s"] = time.perf_counter() - t0
    sae_dir = resid.sae.save(sae, out / "sae")

    t0 = time.perf_counter()
    feat_dir = out / "features"
    if feat_dir.exists():
        shutil.rmtree(feat_dir)  # a harvest of another SAE: resid refuses to mix them
    with torch.no_grad(), model.saes([sae]):
        harvest(model, corpus, feat_dir, [f"{SITE}.sae.hook_acts"], context_length=CONTEXT,
                max_tokens=feature_tokens, k=16, window=(12, 4), exclude_bos=True,
                progress=False)  # fmt: skip
    times["feature_harvest_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dash = out / "dashboard"
    if units == "auto":  # the most often active features
        frac = load_stats(feat_dir, f"{SITE}.sae.hook_acts")["frac_active"]
        units = ",".join(str(int(i)) for i in frac.argsort(descending=True)[:n_pages].sort().values)
    if in_process:
        write_dashboard(feat_dir, dash, model=model, units=units, progress=False, saes=[sae])
    else:
        resid_cli("dashboard", str(feat_dir), "--out", str(dash), "--sae", str(sae_dir),
                  "--model", model_path, "--units", units, "--quiet", timeout=1800)  # fmt: skip
    times["dashboard_s"] = time.perf_counter() - t0
    result = {
        "site": SITE,
        "corpus": "pydoc_data/topics.py",
        "harvested_tokens": int(len(tokens)),
        "train_tokens": int(split),
        "held_out_tokens": int(held_tokens.numel()),
        "feature_harvest_tokens": int(load_stats(feat_dir, f"{SITE}.sae.hook_acts")["count"].max()),
        "d_sae": d_sae,
        "k": k,
        "steps": steps,
        "batch": batch,
        **stats,
        **times,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def screenshot(page: Path, png: Path, size: str = "1280,900") -> None:
    """A headless Chromium screenshot of ``page`` (60 s at most)."""
    browser = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    if browser is None:
        raise SystemExit("no Chromium: apt-get install -y chromium")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={size}",
         f"--screenshot={png.resolve()}", page.resolve().as_uri()],
        check=True, timeout=60, capture_output=True,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="SmolLM2 GGUF file or folder")
    p.add_argument("--out", default="runs/findings-sae")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--feature-tokens", type=int, default=16384)
    p.add_argument("--units", default="auto", help="features to page (auto: the 40 most active)")
    p.add_argument("--screenshot", type=Path, help="PNG of one feature page")
    p.add_argument("--feature", type=int, help="the feature the screenshot shows")
    args = p.parse_args()
    result = run(args.model, args.out, args.max_tokens, args.d_sae, args.k, args.steps,
                 args.batch, args.feature_tokens, args.units)  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.screenshot:
        site = f"{SITE}.sae.hook_acts"
        pages = sorted((Path(args.out) / "dashboard").rglob("*.html"))
        page = next((q for q in pages if args.feature is not None and q.stem == str(args.feature)
                     and site in str(q)), Path(args.out) / "dashboard" / "index.html")  # fmt: skip
        screenshot(page, args.screenshot)
        print(f"screenshot of {page} -> {args.screenshot}")


if __name__ == "__main__":
    main()
