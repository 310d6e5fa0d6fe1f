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
    tokens = repeated_tokens(batch=2, seq_len=10, d_vocab=tiny.cfg.d_vocab)
    assert tokens.shape == (2, 21) and torch.equal(tokens[:, 1:11], tokens[:, 11:])
    scores = head_scores(tiny, tokens)
    assert set(scores) == {"previous_token", "bos", "duplicate_token", "induction"}
    _, cache = tiny.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    torch.testing.assert_close(
        scores["bos"][1], cache["blocks.1.attn.hook_pattern"][..., 0].mean((0, 2))
    )
    assert all(((s.values >= 0) & (s.values <= 1 + 1e-6)).all() for s in scores.values())
