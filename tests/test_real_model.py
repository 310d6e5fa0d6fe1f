"""SmolLM2-135M-Instruct (Llama family, Q4_1 GGUF) against transformers loading the same file.

The file comes from the ``smollm2_path`` fixture (scripts/fetch_smollm2.py, once per
machine); without it these tests skip, naming why. The reference for every number is
transformers' own GGUF loader, tokenizer and ``generate`` (fp32 unless named).
"""

from __future__ import annotations

import pytest
import torch

import resid
from resid.io.gguf import load_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

CHAT = "<|im_start|>user\nWhat is the capital of France? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]
MIXED = (
    """The quick brown fox jumps over the lazy dog. It's 2024-12-06, 07:22 UTC; π ≈ 3.14159.
Numbers: 1, 12, 123, 1234, 12345678901234567890 and -0.5e-3; prices $9.99 / €10,50 / ¥1000.
Café, naïve, façade, Straße, Ærøskøbing; Ελληνικά, русский, 日本語のテキスト, 中文字符, 한국어.
Emoji: 🙂🚀👩‍👩‍👧‍👦 and symbols: ← → ↑ ↓ ∀x∈ℝ: x² ≥ 0.   Tabs\tand  double  spaces,
trailing spaces   \nand blank lines

<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Write code.<|im_end|><|endoftext|><repo_name>resid<file_sep>README.md
```python
def main(argv: list[str] | None = None) -> int:
    for i in range(10):  # don't panic
        print(f"{i:>3d} {i ** 2:#x}", end="\\n")
    return 0
```
<jupyter_code>x = {"a": [1, 2, 3], 'b': None}  # I'm sure they've we'll you'd
URLs: https://example.com/path?q=1&r=2#frag, emails: someone@example.org.
"""
    * 4
)


@pytest.fixture(scope="module")
def gguf_path(smollm2_path):
    return smollm2_path


@pytest.fixture(scope="module")
def hf(gguf_path):
    """(transformers model, tokenizer) from the same GGUF file."""
    kw = dict(gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kw
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def smol(gguf_path) -> resid.Model:
    return resid.load(gguf_path, device="cpu")


def test_shape_and_family(smol):
    c = smol.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.d_vocab) == (30, 576, 9, 3, 49152)
    assert c.architecture == "llama" and c.tie_embeddings and c.normalization == "RMS"


def test_logits_and_every_hidden_state_equal_transformers(smol, hf):
    model, tok = hf
    ids = torch.tensor([tok(CHAT + PROMPTS[0]).input_ids])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
        logits, cache = smol.run_with_cache(ids)
    assert (logits - ref.logits).abs().max() <= 1e-4
    for layer in range(smol.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (ours - ref.hidden_states[layer]).abs().max() <= 1e-4, layer
    # transformers' last state is after the final norm, scale included; resid's (as
    # TransformerLens' RMSNorm) hook_normalized is before the scale
    final = cache["ln_final.hook_normalized"] * smol.ln_final.w
    assert (final - ref.hidden_states[-1]).abs().max() <= 1e-4


def test_tokenizer_equals_transformers(smol, hf):
    _, tok = hf
    assert len(MIXED.encode()) > 3000
    ours = smol.to_tokens(MIXED)[0].tolist()  # add_bos_token is False in this file
    assert ours == tok(MIXED).input_ids
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"):
        assert smol.tokenizer.encode(special) == [tok.convert_tokens_to_ids(special)]
    assert smol.tokenizer.decode(ours) == tok.decode(ours) == MIXED
    assert (smol.tokenizer.bos_token_id, smol.tokenizer.eos_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert smol.tokenizer.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_with_cache_is_bit_identical_to_the_forward(gguf_path, smol, dtype):
    model = smol if dtype == torch.float32 else load_gguf(gguf_path, dtype=dtype, device="cpu")
    tokens, mask = model.to_tokens([CHAT, PROMPTS[2]], return_attention_mask=True)
    with torch.no_grad():
        plain = model(tokens, attention_mask=mask)
        cached, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert plain.dtype == dtype and len(cache) > 30 * 10
    assert torch.equal(plain, cached)


def _hf_generate(model, ids, mask, n):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    return out[:, ids.shape[1] :]


def test_greedy_generation_matches_transformers_single_prompt(smol, hf):
    model, tok = hf
    ids = torch.tensor([tok(PROMPTS[1]).input_ids])
    ref = _hf_generate(model, ids, torch.ones_like(ids), 64)
    ours = smol.generate(ids, 64, temperature=0)[:, ids.shape[1] :]
    assert ref.shape[1] == 64  # no early end-of-sequence: 64 tokens are compared
    assert ours.tolist() == ref.tolist()


def test_greedy_generation_matches_transformers_left_padded_batch(smol, hf):
    model, tok = hf
    batch = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    tokens, mask = smol.to_tokens(PROMPTS, padding_side="left", return_attention_mask=True)
    assert tokens.tolist() == batch.input_ids.tolist()
    assert mask.tolist() == batch.attention_mask.bool().tolist()
    ref = _hf_generate(model, batch.input_ids, batch.attention_mask, 64)
    ours = smol.generate(tokens, 64, temperature=0, attention_mask=mask)[:, tokens.shape[1] :]
    assert ref.shape[1] == 64
    assert ours.tolist() == ref.tolist()


def test_generation_stops_at_the_models_own_end_of_sequence(smol, hf):
    model, tok = hf
    ids = torch.tensor([tok(CHAT).input_ids])
    ref = _hf_generate(model, ids, torch.ones_like(ids), 64)[0].tolist()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert smol.tokenizer.eos_token_id == im_end and ref[-1] == im_end and len(ref) < 64
    stopped = smol.generate(ids, 64, temperature=0)[0, ids.shape[1] :].tolist()
    assert stopped == ref  # by default, as transformers does
    assert smol.generate(CHAT, 64, temperature=0) == tok.decode(ids[0].tolist() + ref[:-1])
    going = smol.generate(ids, 24, temperature=0, stop_at_eos=False)[0, ids.shape[1] :].tolist()
    assert len(going) == 24 and going[: len(ref)] == ref  # on past <|im_end|>
