"""KV-cached generation against a full-recompute loop written here, and against Hugging
Face's ``generate`` on the same weights."""

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import math

import pytest
import torch
from conftest import hf_with

import resid
from resid.core.generation import next_token_distribution, stream

PROMPTS = ["The Eiffel Tower is in", "Hi", "Once upon a time, in a land far"]


@torch.no_grad()
def full_recompute(model, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy generation the slow, obvious way: run the whole sequence for every token."""
    for _ in range(n):
        nxt = model(tokens)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens


def test_greedy_kv_generation_equals_full_recompute(tiny):
    for text in PROMPTS[::2]:
        prompt = tiny.to_tokens(text)
        ours = tiny.generate(prompt, 20, temperature=0)
        assert ours.tolist() == full_recompute(tiny, prompt, 20).tolist()
        assert torch.equal(tiny.generate(prompt, 20, temperature=0, use_kv_cache=False), ours)


def test_padded_batch_generates_what_each_prompt_generates_alone(tiny):
    alone = [full_recompute(tiny, tiny.to_tokens(t), 16)[0, 1:].tolist() for t in PROMPTS]
    texts = tiny.generate(PROMPTS, 16, temperature=0)
    assert texts == [tiny.to_string(ids) for ids in alone]  # no BOS, no padding
    assert texts[1] == tiny.generate(PROMPTS[1], 16, temperature=0)
    # token ids with a mask, padded on either side: each row continues from its last real token
    for side in ("left", "right"):
        tokens, mask = tiny.to_tokens(PROMPTS, padding_side=side, return_attention_mask=True)
        out = tiny.generate(tokens, 16, temperature=0, attention_mask=mask)
        assert out.shape == (3, tokens.shape[1] + 16)
        for row, ids in zip(out.tolist(), alone, strict=True):
            real = row[-len(ids) - 1 :]  # rows come back left-padded
            assert real == [50256] + ids


def test_greedy_matches_transformers_single_and_left_padded(tiny, tiny_hf):
    hf = hf_with(tiny_hf, "eager")
    prompt = tiny.to_tokens(PROMPTS[0])
    ref = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=50256)
    assert tiny.generate(prompt, 30, temperature=0, stop_at_eos=True).tolist() == ref.tolist()

    tokens, mask = tiny.to_tokens(PROMPTS, padding_side="left", return_attention_mask=True)
    ref = hf.generate(
        tokens, attention_mask=mask.long(), max_new_tokens=30, do_sample=False, pad_token_id=50256
    )
    ours = tiny.generate(tokens, 30, temperature=0, attention_mask=mask, stop_at_eos=True)
    assert ours.tolist() == ref.tolist()


def test_per_row_stop_at_eos_matches_transformers(tiny, tiny_hf):
    """An EOS that the first prompt reaches early: that row stops and is padded, the others
    go on, exactly as transformers does it."""
    hf = hf_with(tiny_hf, "eager")
    tokens, mask = tiny.to_tokens(PROMPTS, padding_side="left", return_attention_mask=True)
    free = tiny.generate(tokens, 20, temperature=0, attention_mask=mask)
    eos = free[0, tokens.shape[1] + 2].item()  # row 0's third new token
    ours = tiny.generate(
        tokens, 20, temperature=0, attention_mask=mask, stop_at_eos=True, eos_token_id=eos
    )
    ref = hf.generate(
        tokens,
        attention_mask=mask.long(),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=50256,
        eos_token_id=eos,
    )
    assert ours.tolist() == ref.tolist()
    assert ours.shape[1] > tokens.shape[1] + 3  # the other rows went on
    new = ours[0, tokens.shape[1] :].tolist()
    assert new[:3] == free[0, tokens.shape[1] : tokens.shape[1] + 3].tolist()
    assert new[3:] == [50256] * (len(new) - 3)
    text = tiny.generate(PROMPTS, 20, temperature=0, stop_at_eos=True, eos_token_id=eos)
    # text: the prompt and what came before the EOS
    assert text[0] == tiny.to_string(tiny.to_tokens(PROMPTS[0])[0, 1:].tolist() + new[:2])


def test_generation_stops_at_eos_by_default_as_transformers_does(tiny, tiny_hf):
    """No stop_at_eos: the EOS (here one the first row reaches early) ends a row, as in
    transformers' default generate; stop_at_eos=False generates every token asked for."""
    hf = hf_with(tiny_hf, "eager")
    tokens, mask = tiny.to_tokens(PROMPTS, padding_side="left", return_attention_mask=True)
    free = tiny.generate(tokens, 12, temperature=0, attention_mask=mask, stop_at_eos=False)
    eos = free[0, tokens.shape[1] + 1].item()  # row 0's second new token
    ours = tiny.generate(tokens, 12, temperature=0, attention_mask=mask, eos_token_id=eos)
    ref = hf.generate(tokens, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                      pad_token_id=50256, eos_token_id=eos)  # fmt: skip
    assert ours.tolist() == ref.tolist()
    assert ours[0, tokens.shape[1] + 2 :].tolist() == [50256] * 10  # row 0 finished
    going = tiny.generate(tokens, 12, temperature=0, attention_mask=mask, eos_token_id=eos,
                          stop_at_eos=False)  # fmt: skip
    assert torch.equal(going, free)
    # GPT-2's own EOS is the default: a prompt ending in it would stop at once if emitted
    assert tiny.tokenizer.eos_token_id == 50256


def test_default_stop_needs_no_tokenizer_but_an_explicit_one_does(tiny):
    cfg = dataclasses.replace(tiny.cfg, d_vocab=97)
    model = resid.Model(cfg)  # a vocabulary of its own: no tokenizer, no EOS
    prompt = torch.tensor([[1, 2, 3]])
    assert model.generate(prompt, 5, temperature=0).shape == (1, 8)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(prompt, 5, temperature=0, stop_at_eos=True)
    with pytest.raises(TypeError, match="stop_at_eos"):
        model.generate(prompt, 5, temperature=0, stop_at_eos="yes")


def test_sampling_is_seeded_reproducible_and_leaves_global_rng(tiny):
    state = torch.get_rng_state()
    a = tiny.generate(PROMPTS, 12, temperature=0.9, top_k=40, top_p=0.95, seed=3)
    b = tiny.generate(PROMPTS, 12, temperature=0.9, top_k=40, top_p=0.95, seed=3)
    c = tiny.generate(PROMPTS, 12, temperature=0.9, top_k=40, top_p=0.95, seed=4)
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), state)


def test_top_k_and_top_p_restrict_the_choice(tiny):
    prompt = tiny.to_tokens(PROMPTS[0])
    with torch.no_grad():
        top = tiny(prompt)[0, -1].topk(3).indices.tolist()
    firsts = {tiny.generate(prompt, 1, top_k=3, seed=s)[0, -1].item() for s in range(12)}
    assert firsts <= set(top) and len(firsts) > 1
    nucleus = {tiny.generate(prompt, 1, top_p=1e-6, seed=s)[0, -1].item() for s in range(5)}
    assert nucleus == {top[0]}  # a tiny nucleus holds only the most likely token


def test_top_p_hand_computed():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    e = [math.exp(x) for x in (0.0, 1.0, 2.0)]
    p = [x / sum(e) for x in e]  # 0.090, 0.245, 0.665
    only_top = next_token_distribution(logits, top_p=0.5)
    torch.testing.assert_close(only_top, torch.tensor([[0.0, 0.0, 1.0]]))
    two = next_token_distribution(logits, top_p=0.7)  # 0.665 < 0.7: the second is needed
    expected = torch.tensor([[0.0, p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2])]])
    torch.testing.assert_close(two, expected)
    torch.testing.assert_close(next_token_distribution(logits, top_p=1.0), torch.tensor([p]))


def test_hooks_fire_every_step_on_the_new_positions_only(tiny):
    prompt = tiny.to_tokens(PROMPTS[0])
    seen = []
    with tiny.hooks([("blocks.1.hook_resid_pre", lambda x, hook: seen.append(x.shape))]):
        tiny.generate(prompt, 5, temperature=0)
    d = tiny.cfg.d_model
    assert seen == [(1, prompt.shape[1], d)] + [(1, 1, d)] * 4

    # a hook that writes acts on every step, as in a full recompute under the same hook
    direction = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def steer(x, hook):
        return x + 3 * direction

    with tiny.hooks([("blocks.1.hook_resid_pre", steer)]):
        ours = tiny.generate(prompt, 12, temperature=0)
        ref = full_recompute(tiny, prompt, 12)
    assert ours.tolist() == ref.tolist()
    assert ours.tolist() != tiny.generate(prompt, 12, temperature=0).tolist()


def test_return_logits_and_stream(tiny):
    prompt = tiny.to_tokens(PROMPTS[2])
    out, logits = tiny.generate(prompt, 6, temperature=0, return_logits=True)
    assert logits.shape == (1, 6, tiny.cfg.d_vocab)
    with torch.no_grad():
        full = tiny(out)[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    steps = list(stream(tiny, prompt, 6, temperature=0))
    assert torch.equal(torch.stack(steps, 1), out[:, prompt.shape[1] :])
    assert tiny.generate(PROMPTS[0], 0) == PROMPTS[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=60), "context of 64"),
        (dict(eos_token_id=50257, stop_at_eos=True), "outside the vocabulary"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny.generate(PROMPTS[2], **kwargs)


def test_mask_with_strings_and_wrong_mask_shape_are_refused(tiny):
    with pytest.raises(ValueError, match="attention_mask goes with token ids"):
        tiny.generate(PROMPTS, 3, attention_mask=torch.ones(3, 8))
    tokens = tiny.to_tokens(PROMPTS[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny.generate(tokens, 3, attention_mask=torch.ones(1, 3))


# ---- a generator keeps the hooks and SAEs it was started with (core hardening) ----------
# Web frameworks and asyncio.to_thread run each step in a copied context, or in a thread
# with a context of its own: the steps must still run with the hooks of the context that
# made the generator (before: they ran without them, silently).


def _steer(model):
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return [("blocks.1.hook_resid_pre", lambda x, hook: x + 3 * direction)]


def _in_thread(fn):
    """``fn()`` in a new thread (a context of its own, with no hooks), its result or error."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_a_steered_stream_keeps_its_hooks_in_copied_contexts_and_other_threads(tiny):
    prompt = tiny.to_tokens(PROMPTS[0])
    with tiny.hooks(_steer(tiny)):
        want = full_recompute(tiny, prompt, 8)[0, prompt.shape[1] :].tolist()  # the reference
        copied, plain, later = (stream(tiny, prompt, 8, temperature=0) for _ in range(3))
        first = [next(g).item() for g in (copied, plain)]
    assert want != tiny.generate(prompt, 8, temperature=0)[0, prompt.shape[1] :].tolist()
    assert first == [want[0]] * 2
    # the rest, one step at a time, each in a fresh copy of a hook-free context elsewhere
    elsewhere = lambda: contextvars.copy_context().run(next, copied)  # noqa: E731
    rest = [_in_thread(elsewhere).item() for _ in range(7)]
    assert [first[0], *rest] == want
    # a plain thread: its own (empty) context
    assert [first[1], *_in_thread(lambda: [t.item() for t in plain])] == want

    # iterated only after the `with` block has ended, as asyncio.to_thread does
    async def drain():
        return [(await asyncio.to_thread(next, later)).item() for _ in range(8)]

    assert asyncio.run(drain()) == want
    assert tiny.attached_hooks() == []  # and nothing stayed attached here


def test_a_stream_keeps_its_spliced_sae_in_another_thread(tiny):
    from test_sae import random_sae

    sae = random_sae()
    prompt = tiny.to_tokens(PROMPTS[2])
    with tiny.saes([sae], use_error_term=False):
        want = full_recompute(tiny, prompt, 6)[0, prompt.shape[1] :].tolist()  # no cache
        steps = stream(tiny, prompt, 6, temperature=0)
    assert want != tiny.generate(prompt, 6, temperature=0)[0, prompt.shape[1] :].tolist()
    assert _in_thread(lambda: [t.item() for t in steps]) == want


def test_hooks_attached_only_around_a_later_step_are_refused(tiny):
    """They would not run (the generator keeps its own context's hooks): an error, not a
    silent unsteered step."""
    prompt = tiny.to_tokens(PROMPTS[0])
    steps = stream(tiny, prompt, 4, temperature=0)
    next(steps)
    with tiny.hooks(_steer(tiny)), pytest.raises(ValueError, match="before calling stream"):
        next(steps)
