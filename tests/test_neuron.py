"""Neuron: read/write are the weights the forward uses, and seed 004's definition
(query the normalised state, GELU, scale the write vector) reproduces the MLP."""

import pytest
import torch
import torch.nn.functional as F

from resid.core.neuron import Neuron


@pytest.fixture(scope="module")
def run(tiny):
    tokens = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
    return tokens, cache


def test_read_write_bias_are_the_forwards_weights(tiny, tiny_hf):
    for layer, i in [(0, 0), (1, 17), (1, 255), (-1, -1)]:
        n = tiny.neuron(layer, i)
        mlp, hf = tiny.blocks[layer].mlp, tiny_hf.transformer.h[layer].mlp
        i = i % 256
        # views of the parameters themselves, not copies ...
        assert n.read.untyped_storage().data_ptr() == mlp.W_in.untyped_storage().data_ptr()
        assert n.write.untyped_storage().data_ptr() == mlp.W_out.untyped_storage().data_ptr()
        assert torch.equal(n.read, mlp.W_in[:, i]) and torch.equal(n.write, mlp.W_out[i])
        # ... holding HF's Conv1D weights: c_fc is [d_model, d_mlp], c_proj [d_mlp, d_model]
        assert torch.equal(n.read, hf.c_fc.weight[:, i])
        assert torch.equal(n.write, hf.c_proj.weight[i])
        assert torch.equal(n.bias, hf.c_fc.bias[i])
    assert repr(tiny.neuron(1, 3)) == "Neuron(layer=1, index=3)"


def test_activation_is_hook_post(tiny, run):
    _, cache = run
    worst = 0.0
    for layer in range(2):
        post = cache[f"blocks.{layer}.mlp.hook_post"]
        stream = cache.stream(layer, "mid")
        for i in (0, 5, 100, 255):
            n = tiny.neuron(layer, i)
            for source in (cache, stream, stream.tensor):
                worst = max(worst, (n.activation(source) - post[..., i]).abs().max().item())
            assert n.activation(stream.states[2, 9]) == pytest.approx(
                post[2, 9, i].item(), abs=1e-5
            )
    assert worst < 1e-5, worst


def test_neuron_outputs_sum_to_the_mlp_output(tiny, run):
    """sum_i activation_i * write_i + b_out == hook_mlp_out: the MLP is its neurons."""
    _, cache = run
    for layer in range(2):
        stream = cache.stream(layer, "mid")
        total = sum(tiny.neuron(layer, i).output(stream) for i in range(256))
        total = total + tiny.blocks[layer].mlp.b_out
        torch.testing.assert_close(total, cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=0)


def test_logit_effect_is_write_through_the_unembedding(tiny, tiny_hf):
    n = tiny.neuron(1, 42)
    effect = n.logit_effect(k=5)
    expected = tiny_hf.transformer.h[1].mlp.c_proj.weight[42] @ tiny_hf.lm_head.weight.T
    torch.testing.assert_close(effect.logits, expected, atol=1e-6, rtol=0)
    order = expected.argsort(descending=True)
    assert [t for t, _ in effect.top] == [tiny.tokenizer.decode([i]) for i in order[:5].tolist()]
    assert [t for t, _ in effect.bottom] == [tiny.tokenizer.decode([i]) for i in order.flip(0)[:5].tolist()]  # fmt: skip
    assert effect.top[0][1] == pytest.approx(expected.max().item())
    # through ln_final: the logits' directional derivative along the write, through
    # transformers' final LayerNorm at a state with no spread (where its scale is constant),
    # is a positive multiple of it
    through = n.logit_effect(k=3, through_ln=True).logits.double()
    ln_f = tiny_hf.transformer.ln_f
    w, g, b = (t.detach().double() for t in (n.write, ln_f.weight, ln_f.bias))
    _, tangent = torch.func.jvp(
        lambda x: F.layer_norm(x, (64,), g, b, ln_f.eps), (torch.zeros(64, dtype=w.dtype),), (w,)
    )
    derivative = tangent @ tiny_hf.lm_head.weight.detach().double().T
    ratio = (through @ derivative) / (derivative @ derivative)
    assert ratio > 0
    torch.testing.assert_close(through, ratio * derivative, atol=1e-5, rtol=0)
    assert "up:" in repr(effect)


def test_bad_input_gets_clear_errors(tiny, run):
    _, cache = run
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
        tiny.neuron(2, 0)
    with pytest.raises(ValueError, match=r"neuron index must be in \[0, 256\)"):
        Neuron(tiny, 0, 256)
    with pytest.raises(
        ValueError, match="reads blocks.1.hook_resid_mid, not blocks.1.hook_resid_pre"
    ):
        tiny.neuron(1, 0).activation(cache.stream(1, "pre"))
    with pytest.raises(ValueError, match="d_model=64"):
        tiny.neuron(1, 0).activation(torch.randn(3, 63))
