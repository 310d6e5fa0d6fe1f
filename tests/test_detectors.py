"""Head detectors on hand-built attention patterns, where the right score is known."""

from pathlib import Path

import pytest
import torch

import resid
from resid.analysis.detectors import (
    bos_score,
    detect_head,
    duplicate_token_score,
    head_scores,
    induction_score,
    previous_token_score,
    repeated_tokens,
)


def one_hot_pattern(targets: list[int], n: int) -> torch.Tensor:
    """[1, 1, n, n]: query q attends only to key targets[q]."""
    p = torch.zeros(1, 1, n, n)
    p[0, 0, torch.arange(n), torch.tensor(targets)] = 1
    return p


def test_previous_token_and_bos():
    prev = one_hot_pattern([0, 0, 1, 2, 3], 5)
    assert previous_token_score(prev).item() == 1.0  # queries 1..4 all attend to q - 1
    assert bos_score(prev).item() == pytest.approx(2 / 5)
    uniform = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]
    # queries 1..4 put 1/2, 1/3, 1/4, 1/5 on q - 1
    expected = (1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4
    torch.testing.assert_close(previous_token_score(uniform[None, None]), torch.tensor([expected]))


def test_duplicate_and_induction_on_a_repeated_sequence():
    tokens = torch.tensor([[50256, 7, 8, 9, 7, 8, 9]])
    # a perfect induction head: query 4 (token 7) attends to 2 (after the earlier 7), …
    induction = one_hot_pattern([0, 0, 0, 0, 2, 3, 4], 7)
    assert induction_score(induction, tokens).item() == 1.0
    assert duplicate_token_score(induction, tokens).item() == 0.0
    duplicate = one_hot_pattern([0, 0, 0, 0, 1, 2, 3], 7)
    assert duplicate_token_score(duplicate, tokens).item() == 1.0
    assert induction_score(duplicate, tokens).item() == 0.0


def test_repeated_tokens_and_model_scores(tiny):
    tokens = repeated_tokens(batch=2, seq_len=10, model=tiny)
    assert tokens.shape == (2, 21) and torch.equal(tokens[:, 1:11], tokens[:, 11:])
    scores = head_scores(tiny, tokens)
    assert set(scores) == {"previous_token", "bos", "duplicate_token", "induction"}
    # patterns planted at layer 1 by a hook, scored by hand: head 0 all on BOS, head 1 on
    # the previous token (query 0 on itself), head 2 uniform over the prefix
    T = tokens.shape[1]

    def plant(pattern, hook):
        p = pattern.clone()
        p[:, :3] = 0
        p[:, 0, :, 0] = 1
        p[:, 1, 0, 0] = 1
        p[:, 1, torch.arange(1, T), torch.arange(T - 1)] = 1
        p[:, 2] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
        return p

    with tiny.hooks([("blocks.1.attn.hook_pattern", plant)]):
        planted = head_scores(tiny, tokens)
    bos, prev = planted["bos"].values[1, :3], planted["previous_token"].values[1, :3]
    uniform_bos = sum(1 / (q + 1) for q in range(T)) / T
    uniform_prev = sum(1 / (q + 1) for q in range(1, T)) / (T - 1)
    torch.testing.assert_close(bos, torch.tensor([1.0, 2 / T, uniform_bos]))
    torch.testing.assert_close(prev, torch.tensor([1 / (T - 1), 1.0, uniform_prev]))
    assert all(((s.values >= 0) & (s.values <= 1 + 1e-6)).all() for s in scores.values())


# ---- detect_head: TransformerLens' detector, options and error measures ----------------

PROMPT = "The cat sat on the mat. The cat sat on the mat. A dog ran."
PROMPTS = [PROMPT, "One two three one two three four", "Hi there, hi there"]


@pytest.fixture(scope="module")
def tl_bridge(tiny_hf):
    pytest.importorskip("transformer_lens")
    from resid.io.references import transformer_lens_bridge

    return transformer_lens_bridge(tiny_hf)


@pytest.mark.parametrize("name", ["previous_token_head", "duplicate_token_head", "induction_head"])
@pytest.mark.parametrize("measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude", [(False, False), (True, False), (False, True), (True, True)])
def test_detect_head_equals_transformer_lens(tiny, tl_bridge, name, measure, exclude):
    """Same weights, same prompt, same options: TransformerLens rounds "abs" to 3 decimals,
    so there the bound is half a unit of the third decimal."""
    from transformer_lens.head_detector import detect_head as tl_detect_head

    kw = dict(exclude_bos=exclude[0], exclude_current_token=exclude[1], error_measure=measure)
    theirs = tl_detect_head(tl_bridge, PROMPT, name, **kw).float()
    ours = detect_head(tiny, PROMPT, name, **kw)
    assert ours.axes == ("layer", "head") and ours.values.shape == theirs.shape
    atol = 5e-4 + 1e-6 if measure == "abs" else 1e-5
    torch.testing.assert_close(ours.values, theirs, atol=atol, rtol=0)


@pytest.mark.parametrize("measure", ["mul", "abs"])
def test_detect_head_on_several_prompts_is_their_mean_as_transformer_lens(tiny, tl_bridge, measure):
    """A list of prompts runs here as one padded batch; TransformerLens runs each alone."""
    from transformer_lens.head_detector import detect_head as tl_detect_head

    theirs = tl_detect_head(tl_bridge, PROMPTS, "induction_head", error_measure=measure)
    for side in ("right", "left"):
        tokens, mask = tiny.to_tokens(PROMPTS, padding_side=side, return_attention_mask=True)
        ours = detect_head(
            tiny, tokens, "induction_head", error_measure=measure, attention_mask=mask
        )
        atol = 5e-4 + 1e-6 if measure == "abs" else 1e-5
        torch.testing.assert_close(ours.values, theirs.float(), atol=atol, rtol=0)
    # the heads option: the rest score -1, as in TransformerLens
    only = detect_head(tiny, PROMPTS, "induction_head", heads={1: [2]}, error_measure=measure)
    assert (only.values[0] == -1).all() and only.values[1, 2] > -1
    assert torch.equal(
        only.values,
        detect_head(tiny, PROMPTS, "induction_head", heads=[(1, 2)], error_measure=measure).values,
    )


def test_detect_head_custom_pattern_by_hand(tiny, tl_bridge):
    """A planted pattern scored by hand: head 0 puts 1/2 on the previous token and 1/2 on
    itself; the detection pattern expects all of it on the previous token."""
    from transformer_lens.head_detector import detect_head as tl_detect_head

    tokens = tiny.to_tokens(PROMPT)
    T = tokens.shape[1]
    expected = torch.zeros(T, T)
    expected[torch.arange(1, T), torch.arange(T - 1)] = 1.0

    def plant(pattern, hook):
        p = pattern.clone()
        p[:, 0] = 0
        p[:, 0, 0, 0] = 1
        p[:, 0, torch.arange(1, T), torch.arange(T - 1)] = 0.5
        p[:, 0, torch.arange(1, T), torch.arange(1, T)] = 0.5
        return p

    with tiny.hooks([("blocks.0.attn.hook_pattern", plant)]):
        mul = detect_head(tiny, tokens, expected)
        absolute = detect_head(tiny, tokens, expected, error_measure="abs")
        no_self = detect_head(tiny, tokens, expected, exclude_current_token=True)
    # mul: (T - 1) halves of mass over T rows of mass 1
    assert mul.values[0, 0].item() == pytest.approx((T - 1) / 2 / T, abs=1e-6)
    # abs: row 0 matches nothing (|1 - 0|), rows 1.. miss by 1/2 + 1/2
    assert absolute.values[0, 0].item() == pytest.approx(1 - (1 + (T - 1)) / T, abs=1e-6)
    # without the diagonal: all that is left is on the previous token
    assert no_self.values[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    # unplanted: as TransformerLens scores the same custom pattern
    theirs = tl_detect_head(tl_bridge, PROMPT, expected)
    torch.testing.assert_close(
        detect_head(tiny, tokens, expected).values, theirs.float(), atol=1e-5, rtol=0
    )


def test_detect_head_bad_input(tiny):
    tokens = tiny.to_tokens(PROMPT)
    T = tokens.shape[1]
    with pytest.raises(ValueError, match="lower triangular"):
        detect_head(tiny, tokens, torch.ones(T, T))
    with pytest.raises(ValueError, match=rf"\[{T}, {T}\]"):
        detect_head(tiny, tokens, torch.zeros(T - 1, T - 1))
    with pytest.raises(ValueError, match="not one of"):
        detect_head(tiny, tokens, "copying_head")
    with pytest.raises(ValueError, match="error_measure"):
        detect_head(tiny, tokens, "induction_head", error_measure="l2")
    with pytest.raises(ValueError, match="not a \\(layer, head\\)"):
        detect_head(tiny, tokens, "induction_head", heads=[(5, 0)])
    with pytest.warns(UserWarning, match="other than 0 and 1"):
        detect_head(tiny, tokens, torch.tril(torch.full((T, T), 0.5)))


def test_repeated_tokens_takes_bos_and_vocabulary_from_the_model(tiny, tmp_path):
    t = repeated_tokens(3, 50, model=tiny)
    assert (t[:, 0] == tiny.tokenizer.bos_token_id).all()
    toy = resid.load(Path(__file__).parents[1] / "notebooks" / "toy-induction", device="cpu")
    with pytest.raises(ValueError, match="bos="):
        repeated_tokens(3, 50, model=toy)  # a vocabulary of its own, no tokenizer: say which
    t = repeated_tokens(64, 50, d_vocab=toy.cfg.d_vocab, bos=0)
    assert (t[:, 0] == 0).all() and (t[:, 1:] != 0).all(), "BOS only at position 0"
    assert t.max() == toy.cfg.d_vocab - 1, "the whole vocabulary is used"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        repeated_tokens(1, 5, d_vocab=128, bos=50256)
