"""Hooks: what they see, what they change, and that they never stay attached."""

import pytest
import torch

from resid.core import hooks
from resid.core.hooks import HookPoint


def attached(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fns]


def test_every_site_has_transformer_lens_name_and_shape(tiny, tokens):
    _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: True)
    b, p, (d, h, e, m) = 3, 17, (64, 4, 16, 256)
    expected = {
        "hook_embed": (b, p, d), "hook_pos_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1),
        "ln_final.hook_normalized": (b, p, d), "hook_tokens": (b, p),
    }  # fmt: skip
    for layer in range(2):
        for name, shape in {
            "hook_resid_pre": (b, p, d), "ln1.hook_scale": (b, p, 1), "ln1.hook_normalized": (b, p, d),
            "attn.hook_q": (b, p, h, e), "attn.hook_k": (b, p, h, e), "attn.hook_v": (b, p, h, e),
            "attn.hook_attn_scores": (b, h, p, p), "attn.hook_pattern": (b, h, p, p),
            "attn.hook_z": (b, p, h, e), "attn.hook_result": (b, p, h, d), "hook_attn_out": (b, p, d),
            "hook_resid_mid": (b, p, d), "ln2.hook_scale": (b, p, 1), "ln2.hook_normalized": (b, p, d),
            "mlp.hook_pre": (b, p, m), "mlp.hook_post": (b, p, m), "hook_mlp_out": (b, p, d),
            "hook_resid_post": (b, p, d), "hook_attn_in": (b, p, h, d), "hook_q_input": (b, p, h, d),
            "hook_k_input": (b, p, h, d), "hook_v_input": (b, p, h, d), "hook_mlp_in": (b, p, d),
        }.items():  # fmt: skip
            expected[f"blocks.{layer}.{name}"] = shape
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected
    assert attached(tiny) == []


def test_cache_laws(tiny, tiny_hf, tokens):
    """resid_mid = resid_pre + attn_out; each head's result is its z times its rows of
    transformers' c_proj, and they sum to attn_out less b_O; the pattern is the softmax of
    the scores; hook_normalized is unit-variance."""
    _, c = tiny.run_with_cache(tokens, names_filter=lambda n: True)
    for layer in range(2):
        blk = f"blocks.{layer}"
        torch.testing.assert_close(
            c[f"{blk}.hook_resid_mid"], c[f"{blk}.hook_resid_pre"] + c[f"{blk}.hook_attn_out"]
        )
        torch.testing.assert_close(
            c[f"{blk}.hook_resid_post"], c[f"{blk}.hook_resid_mid"] + c[f"{blk}.hook_mlp_out"]
        )
        heads = c[f"{blk}.attn.hook_result"].sum(2) + tiny.blocks[layer].attn.b_O
        torch.testing.assert_close(heads, c[f"{blk}.hook_attn_out"], atol=1e-5, rtol=0)
        c_proj = tiny_hf.transformer.h[layer].attn.c_proj.weight.detach()  # [h * e, d]
        for head in range(4):
            by_hand = c[f"{blk}.attn.hook_z"][:, :, head] @ c_proj[16 * head : 16 * (head + 1)]
            torch.testing.assert_close(
                c[f"{blk}.attn.hook_result"][:, :, head], by_hand, atol=1e-5, rtol=0
            )
        torch.testing.assert_close(
            c[f"{blk}.attn.hook_pattern"], c[f"{blk}.attn.hook_attn_scores"].softmax(-1)
        )
        assert torch.isinf(c[f"{blk}.attn.hook_attn_scores"][0, 0, 0, 1])
        normalized = c[f"{blk}.ln1.hook_normalized"]
        torch.testing.assert_close(normalized.pow(2).mean(-1), torch.ones(3, 17), atol=1e-3, rtol=0)
    resid0 = c["hook_embed"] + c["hook_pos_embed"]
    torch.testing.assert_close(c["blocks.0.hook_resid_pre"], resid0)
    assert torch.equal(c["hook_embed"][0, 3], tiny.W_E[tokens[0, 3]])


def test_run_with_hooks_changes_output_like_a_hand_edit(tiny, tokens):
    def zero_head_2(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with torch.no_grad():
        hooked = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_2)])
        W_O = tiny.blocks[1].attn.W_O
        saved = W_O[2].clone()
        W_O[2] = 0  # the same ablation, done to the weights by hand
        try:
            by_hand = tiny(tokens)
        finally:
            W_O[2] = saved
        plain = tiny(tokens)
    torch.testing.assert_close(hooked, by_hand, atol=1e-5, rtol=0)
    assert (hooked - plain).abs().max() > 1e-2
    assert attached(tiny) == []


def test_filters_lists_and_context_manager(tiny, tokens):
    seen = []
    record = lambda act, hook: seen.append(hook.name)  # noqa: E731
    with tiny.hooks([(lambda n: n.endswith("hook_resid_post"), record), ("hook_embed", record)]):
        assert attached(tiny) == [
            "hook_embed",
            "blocks.0.hook_resid_post",
            "blocks.1.hook_resid_post",
        ]
        tiny(tokens)
    assert seen == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert attached(tiny) == []
    _, cache = tiny.run_with_cache(tokens, names_filter=["blocks.1.hook_mlp_out", "hook_pos_embed"])
    assert sorted(cache) == ["blocks.1.hook_mlp_out", "hook_pos_embed"]


def test_unknown_hook_name_suggests_close_names(tiny, tokens):
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_per", lambda a, h: None)])
    with pytest.raises(KeyError, match="no hook point named"):
        tiny.run_with_cache(tokens, names_filter=["blocks.9.hook_resid_pre"])
    assert attached(tiny) == []


def test_wrong_shape_names_the_hook_and_detaches(tiny, tokens):
    first = lambda act, hook: None  # noqa: E731 - attached before the bad one, must go too
    bad = lambda act, hook: act[:, :-1]  # noqa: E731
    with pytest.raises(ValueError, match="blocks.1.mlp.hook_post"):
        tiny.run_with_hooks(
            tokens, fwd_hooks=[("hook_embed", first), ("blocks.1.mlp.hook_post", bad)]
        )
    assert attached(tiny) == []


def test_hooks_removed_when_forward_raises(tiny, tokens):
    def boom(act, hook):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        with tiny.hooks([("blocks.0.hook_resid_pre", boom), ("hook_embed", lambda a, h: None)]):
            tiny(tokens)
    assert attached(tiny) == []


def test_bad_input_changes_nothing(tiny, tokens):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    original = tokens.clone()
    for bad, message in [
        (torch.zeros(1, 65, dtype=torch.long), "context of 64"),
        (torch.tensor([[1, 50257, 3]]), r"outside the vocabulary"),
        (torch.tensor([[1, -1]]), r"outside the vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(2, 3), "integers"),
        (torch.zeros(2, 3, 4, dtype=torch.long), r"\[batch, pos\]"),
        ([], "non-empty list"),
        ("", "empty"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            tiny(bad)
    tiny(tokens)
    assert torch.equal(tokens, original)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_hook_point_alone():
    hp = HookPoint()
    hp.name = "x"
    with hooks.attached({"x": hp}, [("x", lambda t, hook: t * 2)]):
        assert torch.equal(hp(torch.ones(2)), torch.full((2,), 2.0))
    assert hp.fns == () and torch.equal(hp(torch.ones(2)), torch.ones(2))


@pytest.mark.parametrize(
    "bad,what",
    [
        (lambda a, h: a.double(), "dtype torch.float64"),
        (lambda a, h: a.half(), "dtype torch.float16"),
        (lambda a, h: a.long(), "dtype torch.int64"),
        (lambda a, h: a > 0, "dtype torch.bool"),
        (lambda a, h: a.to("meta"), "device meta"),
        (lambda a, h: 3.0, "returned float"),
    ],
)
def test_a_hook_returning_the_wrong_kind_of_tensor_names_itself_and_the_site(
    tiny, tokens, bad, what
):
    """Issue 11, item 7: before, a float64 or int return failed later inside a matmul with
    'mat1 and mat2 must have the same dtype', naming neither the hook nor the site."""

    def my_bad_hook(act, hook):
        return bad(act, hook)

    with pytest.raises(
        (ValueError, TypeError), match=f"my_bad_hook.*blocks.1.mlp.hook_post.*{what}"
    ):
        tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", my_bad_hook)])
    assert attached(tiny) == []


def test_to_str_tokens_of_a_list_of_strings(tiny):
    """Issue 11, item 8: a list of strings gives one list of token strings per string (it
    raised "'str' object cannot be interpreted as an integer")."""
    got = tiny.to_str_tokens(["Hello world", "Hi"])
    assert got == [tiny.to_str_tokens("Hello world"), tiny.to_str_tokens("Hi")]
    assert got[1] == ["<|endoftext|>", "Hi"]
