"""GGUF loading: files written here by the gguf package's own GGUFWriter from tiny random
transformers models (llama and gpt2, several quantisation types), read by resid and by
transformers' GGUF loader; and malformed or truncated files refused with CheckpointError.

The writer below lays tensors out as llama.cpp's converter does (its rotary row order for
llama's q and k, ``nn.Linear`` ``[out, in]`` for GPT-2's linear layers); it is the test's
own plain reference, not resid's code.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

import resid
from resid.io.errors import CheckpointError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from resid.io.gguf import load_gguf, read_header, unpermute_rotary  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
D, HEADS, KV, MLP, LAYERS, CTX = 64, 4, 2, 128, 2, 64
# transformers' GGUF reader maps a gpt2 file's context_length to n_ctx and ignores its
# feed_forward_length, so its reference GPT-2 has GPT-2's own 1024 positions and 4 * d MLP
GPT2_CTX, GPT2_MLP = 1024, 4 * D
SPECIAL = "<|endoftext|>"
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("Ġ", "a")]


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (written out here, independently)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


TOKENS = byte_alphabet() + ["".join(m) for m in MERGES] + [SPECIAL]
VOCAB = len(TOKENS)


def hf_llama(seed: int = 0, tied: bool = False):
    cfg = transformers.LlamaConfig(
        hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=KV,
        intermediate_size=MLP, num_hidden_layers=LAYERS, vocab_size=VOCAB,
        max_position_embeddings=CTX, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_inner=GPT2_MLP,
                                  n_positions=GPT2_CTX, vocab_size=VOCAB, initializer_range=0.2)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return model


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows (two halves) interleaved pairwise."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF names -> numpy arrays in llama.cpp's layout."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {}
    if isinstance(model, transformers.LlamaForCausalLM):
        out["token_embd.weight"] = sd["model.embed_tokens.weight"]
        out["output_norm.weight"] = sd["model.norm.weight"]
        if not model.config.tie_word_embeddings:
            out["output.weight"] = sd["lm_head.weight"]
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            out |= {
                f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
                f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], HEADS),
                f"blk.{i}.attn_k.weight": llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], KV),
                f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
            }  # fmt: skip
        return out
    out |= {"token_embd.weight": sd["transformer.wte.weight"],
            "position_embd.weight": sd["transformer.wpe.weight"],
            "output_norm.weight": sd["transformer.ln_f.weight"],
            "output_norm.bias": sd["transformer.ln_f.bias"]}  # fmt: skip
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv",
             "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
    for i in range(LAYERS):
        for hf, g in names.items():
            w = sd[f"transformer.h.{i}.{hf}.weight"]
            out[f"blk.{i}.{g}.weight"] = (
                w if hf.startswith("ln") else w.T.copy()
            )  # Conv1D -> [out, in]
            out[f"blk.{i}.{g}.bias"] = sd[f"transformer.h.{i}.{hf}.bias"]
    return out


def write_gguf(path, model, qtype=Q.F32, tokenizer: bool = True, **changed) -> None:
    """``model`` as a GGUF file; ``changed`` replaces metadata values (``None`` drops one)."""
    arch = "llama" if isinstance(model, transformers.LlamaForCausalLM) else "gpt2"
    meta = {"block_count": LAYERS, "context_length": CTX, "embedding_length": D,
            "feed_forward_length": MLP, "attention.head_count": HEADS, "vocab_size": VOCAB}  # fmt: skip
    if arch == "llama":
        meta |= {"attention.head_count_kv": KV, "attention.layer_norm_rms_epsilon": 1e-5,
                 "rope.freq_base": 10000.0, "rope.dimension_count": D // HEADS}  # fmt: skip
    else:
        meta |= {"attention.layer_norm_epsilon": 1e-5, "context_length": GPT2_CTX,
                 "feed_forward_length": GPT2_MLP}  # fmt: skip
    meta |= {k.replace("__", "."): v for k, v in changed.items()}
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        full = key if key.startswith("general.") else f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        elif value is not None:
            w.add_uint32(full, value)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(TOKENS)
        w.add_token_merges([" ".join(m) for m in MERGES])
        w.add_token_types([1] * (VOCAB - 1) + [3])  # the last is a control token
        w.add_bos_token_id(VOCAB - 1)
        w.add_eos_token_id(VOCAB - 1)
        w.add_add_bos_token(False)
    for name, x in gguf_tensors(model).items():
        if x.ndim == 1 or qtype == Q.F32:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(name, x.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_from_gguf(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype
    ).eval()


TOKENS_IN = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_equal_transformers_loading_the_same_file(tmp_path, family, qtype):
    hf = hf_llama() if family == "llama" else hf_gpt2()
    path = tmp_path / f"tiny-{family}.{qtype.name}.gguf"
    write_gguf(path, hf, qtype)
    ours = load_gguf(path, device="cpu")
    ref = hf_from_gguf(path)
    assert ours.cfg.architecture == family
    with torch.no_grad():
        expected = ref(TOKENS_IN).logits
        got = ours(TOKENS_IN)
    assert expected.abs().max() > 0.5  # logits worth comparing
    assert (got - expected).abs().max() <= 1e-4
    if qtype == Q.F32:  # unquantised: the original model, exactly as transformers computes it
        with torch.no_grad():
            assert (got - hf(TOKENS_IN).logits).abs().max() <= 1e-4


def test_resid_load_dispatches_and_dtype_is_as_asked(tmp_path):
    path = tmp_path / "tiny.Q8_0.gguf"
    write_gguf(path, hf_llama(seed=1, tied=True), Q.Q8_0)
    model = resid.load(path, device="cpu", dtype=torch.bfloat16)
    ref = hf_from_gguf(path, torch.bfloat16)
    assert model.W_E.dtype == torch.bfloat16 and model.cfg.tie_embeddings
    assert torch.equal(model.W_E, ref.model.embed_tokens.weight)


def test_tokenizer_from_metadata_equals_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_gpt2())
    model = load_gguf(path, device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = f"the theater in an anther{SPECIAL} ate 12 ÿ\n\n  then"
    assert model.to_tokens(text)[0].tolist() == tok(text).input_ids  # add_bos_token False
    assert model.tokenizer.encode(SPECIAL) == [VOCAB - 1]
    assert model.tokenizer.decode(tok(text).input_ids) == text
    bare = tmp_path / "bare.gguf"
    write_gguf(bare, hf_gpt2(), tokenizer=False)
    assert load_gguf(bare, device="cpu")._tokenizer is None  # no tokenizer: pass token ids


def test_unpermute_undoes_llama_cpps_rotary_permutation():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    back = unpermute_rotary(torch.from_numpy(llama_cpp_permute(w, 2)), 2)
    assert torch.equal(back, torch.from_numpy(w))


# ---- malformed files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_gguf(path, hf_llama(seed=2), Q.Q4_0)
    return path.read_bytes()


def _refused(tmp_path, data: bytes, match: str):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match):
        load_gguf(path, device="cpu")


def test_truncated_files_are_refused(tmp_path, good):
    tensors_end = len(good)
    for cut in (0, 3, 10, 23, 40, 1000, tensors_end // 2, tensors_end - 1):
        _refused(tmp_path, good[:cut], r"too short|truncated|ends inside|not a GGUF|runs past")


def test_malformed_headers_are_refused(tmp_path, good):
    _refused(tmp_path, b"GGML" + good[4:], "does not start with b'GGUF'")
    _refused(tmp_path, good[:4] + struct.pack("<I", 1) + good[8:], "version 1")
    _refused(tmp_path, good[:4] + struct.pack(">I", 3) + good[8:], "big-endian")
    _refused(tmp_path, good[:8] + struct.pack("<Q", 1 << 40) + good[16:], "tensors")
    _refused(tmp_path, good[:16] + struct.pack("<Q", 1 << 40) + good[24:], "metadata keys")
    h = read_header_of(tmp_path, good)
    # a tensor count one short: the last tensor record is read as data, the rest is missing
    _refused(
        tmp_path,
        good[:8] + struct.pack("<Q", len(h.tensors) - 1) + good[16:],
        "missing tensors|truncated|not aligned|overlaps",
    )


def read_header_of(tmp_path, data: bytes):
    path = tmp_path / "h.gguf"
    path.write_bytes(data)
    return read_header(path)


def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path):
    model = hf_llama(seed=3)
    cases = [
        (dict(embedding_length=1 << 30), r"embedding_length must be"),
        (dict(attention__head_count=8, rope__dimension_count=8), r"mis-shaped tensors \(4\)"),
        (dict(attention__head_count=3), "rotary over 16 of 21"),
        (dict(general__alignment=24), "power of two"),
        (dict(rope__scaling__type="yarn"), "rotary"),
        (dict(attention__layer_norm_rms_epsilon=float("nan")), "positive"),
        (dict(block_count=None), "block_count must be"),
        (dict(block_count=4000), r"missing tensors \(\d+\): blk\.2\."),  # before any is read
        (dict(block_count=1), r"unexpected tensors \(\d+\): blk\.1\."),
    ]
    for changed, match in cases:
        path = tmp_path / "k.gguf"
        write_gguf(path, model, **changed)
        with pytest.raises(CheckpointError, match=match):
            load_gguf(path, device="cpu")


def test_unsupported_architecture_and_non_finite_weights(tmp_path):
    path = tmp_path / "n.gguf"
    model = hf_llama(seed=4)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    write_gguf(path, model)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_gguf(path, device="cpu")
    data = path.read_bytes().replace(b"llama", b"llamo")
    _refused(tmp_path, data, "'llamo' architecture")


def test_a_folder_or_fifo_is_refused(tmp_path):
    (tmp_path / "d.gguf").mkdir()
    os.mkfifo(tmp_path / "f.gguf")
    for name in ("d.gguf", "f.gguf"):
        with pytest.raises(CheckpointError, match="regular file"):
            load_gguf(tmp_path / name)
