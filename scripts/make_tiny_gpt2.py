"""Write a random GPT-2 as Hugging Face saves it (config.json + model.safetensors): the
offline stand-in for the real one.

By default it has GPT-2 small's shape (12 layers, 12 heads, d_model 768, 1024 positions,
GPT-2's vocabulary and tokenizer), so that every example in the README runs on it as
written: `python scripts/make_tiny_gpt2.py gpt2-random && resid compare gpt2-random`
(about 20 s and 475 MB). `--layers 2 --heads 4 --d-model 64` writes a tiny one (13 MB).
The weights are scaled up from GPT-2's init so that logits are O(1-10), not near zero.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "gpt2-random"  # where the README's set-up writes it


def save(model, out: str | Path) -> Path:
    """``model.save_pretrained(out)``, but into a temporary sibling first, then moved into
    place file by file (the weights last), so a kill leaves no half-written checkpoint; and
    every file gets the umask's permissions (transformers writes the weights owner-only)."""
    out = Path(out)
    mask = os.umask(0)
    os.umask(mask)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors"):
            f.chmod(0o666 & ~mask)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # empty unless something failed
    return out


def write(out: str | Path, layers: int = 12, heads: int = 12, d_model: int = 768,
          n_ctx: int = 1024, std: float = 0.1, seed: int = 0) -> Path:  # fmt: skip
    """Write the random GPT-2 to ``out`` (a Hugging Face folder) and return its path."""
    from resid.io.references import random_hf_gpt2  # transformers: the dev extra

    shape = dict(n_layer=layers, n_head=heads, n_embd=d_model, n_positions=n_ctx)
    return save(random_hf_gpt2(seed, std, **shape), out)


def _hub_cache() -> Path:
    """Hugging Face's cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home) / "hub"


def _gpt2_reachable(repo: str = "openai-community/gpt2") -> bool:
    """Whether GPT-2 can be loaded: in the Hugging Face cache, or downloadable now. Offline,
    huggingface_hub is not even imported (its tqdm.auto warns in a notebook without
    ipywidgets)."""
    snapshots = _hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    if any(snapshots.glob("*/model.safetensors")):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    import huggingface_hub

    try:
        huggingface_hub.hf_hub_download(repo, "config.json", etag_timeout=5)
    except Exception:  # no network, no hub: any failure means "not reachable"
        return False
    return True


def notebook_model(env: str = "RESID_MODEL") -> str:
    """The model a notebook loads: ``$RESID_MODEL`` if set; else GPT-2 when it is cached or
    a network reaches the hub; else the random stand-in ``gpt2-random/`` that the README's
    set-up writes (written now if missing), announced by one printed line."""
    if os.environ.get(env):
        return os.environ[env]
    if _gpt2_reachable():
        return "gpt2"
    made = "" if (STANDIN / "model.safetensors").is_file() else " (writing it now, about 20 s)"
    print(f"No {env} and no GPT-2 offline: using the random stand-in {STANDIN.name}/{made}; "
          "its numbers are shapes, not findings.")  # fmt: skip
    if made:
        write(STANDIN)
    return str(STANDIN)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-ctx", type=int, default=1024, help="positions (default: 1024)")
    p.add_argument(
        "--std", type=float, default=0.02,
        help="weights' standard deviation (default 0.02, GPT-2's own initialisation: at 12 "
        "layers 0.1 grows the stream until float32 rounding alone, SDPA against an explicit "
        "softmax, passes resid compare's per-site tolerance)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write(args.out, args.layers, args.heads, args.d_model, args.n_ctx, args.std, args.seed)
    print(f"wrote a random {args.layers}-layer, {args.heads}-head GPT-2 to {args.out}/")


if __name__ == "__main__":
    main()
