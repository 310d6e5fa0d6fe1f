"""The table of hook-site facts (resid.core.names) against the model itself: every hook
point a model has is described, and the axes the table gives are the shapes the forward
pass produces, on a GPT-2 and on a rotary, RMSNorm, gated, grouped-query model."""

from __future__ import annotations

import math

import pytest
import torch

import resid
from resid.core import names

GPT2 = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=50, n_ctx=16)
LLAMA = dict(
    GPT2, normalization="RMS", positional="rotary", gated_mlp=True, n_kv_heads=2, act_fn="silu"
)


@pytest.mark.parametrize("shape", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_every_site_is_described_with_the_shape_the_forward_gives(shape):
    cfg = resid.Config(**shape)
    model = resid.Model(cfg)
    seen: dict[str, tuple[int, ...]] = {}
    fwd = [
        (n, lambda a, hook: seen.__setitem__(hook.name, tuple(a.shape))) for n in model.hook_names
    ]
    batch, pos = 2, 5
    model.run_with_hooks(torch.randint(0, cfg.d_vocab, (batch, pos)), fwd_hooks=fwd)
    assert set(seen) == set(model.hook_names)
    for name, actual in seen.items():
        site = names.info(name)
        assert site is not None, name
        want = [batch if a == "batch" else pos if "pos" in a else s
                for a, s in zip(site.axes, site.sizes(cfg), strict=True)]  # fmt: skip
        assert list(actual) == want, (name, site.axes)
        w = names.width(name, cfg)
        if site.per_token:  # the vector per token: every axis after batch and position
            assert w == math.prod(actual[2:]), name
        else:
            assert w is None
        parsed = names.parse(name)
        assert parsed.name == name and parsed.suffix == ""
        assert parsed.layer == names.layer_of(name)
        if site.short is not None:  # act_name spells it back
            assert names.act_name(site.short, parsed.layer) == name


def test_hand_written_facts():
    cfg = resid.Config(**LLAMA)
    assert names.act_name("scores", 1) == "blocks.1.attn.hook_attn_scores"
    assert names.act_name("embed") == "hook_embed"
    assert names.act_name("normalized") == "ln_final.hook_normalized"
    assert names.act_name("scale", 0, "ln2") == "blocks.0.ln2.hook_scale"
    assert names.width("blocks.0.attn.hook_k", cfg) == 2 * 4  # kv heads, not query heads
    assert names.width("blocks.0.attn.hook_z", cfg) == 4 * 4
    assert names.info("blocks.0.attn.hook_pattern").head_axis == 1
    assert names.info("blocks.0.attn.hook_pattern").pos_axis == 2
    assert names.info("blocks.0.attn.hook_z").head_axis == 2
    assert names.info("blocks.0.hook_resid_pre").head_axis is None
    assert names.info("ln_final.hook_scale").fp32
    p = names.parse("blocks.12.hook_resid_pre.sae.hook_acts")
    assert (p.name, p.layer, p.site.short, p.suffix) == (
        "blocks.12.hook_resid_pre",
        12,
        "resid_pre",
        "sae.hook_acts",
    )
    assert names.info("blocks.12.hook_resid_pre.sae.hook_acts") is None
    assert names.parse("blocks.x.hook_resid_pre") is None
    assert names.parse("hook_resid_pre") is None  # a block site needs its block
    assert names.stream_site("blocks.3.hook_resid_post") == ("blocks.3.hook_resid_post", 3, "post")
    assert names.stream_site("blocks.3.hook_attn_out") is None
    with pytest.raises(KeyError, match="act_name"):
        names.site_info("blocks.0.hook_nothing")
    with pytest.raises(KeyError, match="short names"):
        names.act_name("nothing", 0)
