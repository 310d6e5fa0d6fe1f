"""Head detectors on hand-built attention patterns, where the right score is known."""

import pytest
import torch

from resid.analysis.detectors import (
    bos_score,
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
