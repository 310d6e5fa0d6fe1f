"""Padding never reaches a result: every real token of a padded batch computes what its
prompt computes alone, and losses, metrics and detectors leave the padding out. Each check
is against the prompts run one at a time, or numbers worked out here."""

import pytest
import torch
import torch.nn.functional as F

from resid import metrics
from resid.analysis.detectors import head_scores
from resid.interventions.metrics import Metric

# different lengths, repeated tokens (for the detectors) and a literal <|endoftext|> (= pad id)
TEXTS = [
    "The cat sat on the mat. The cat sat on the mat.",
    "Hi",
    "one two three one two three<|endoftext|> one two",
    "A B C D A B C D E",
]


@pytest.fixture(scope="module")
def alone(tiny):
    """Each prompt run by itself: (tokens [pos], logits [pos, d_vocab], cache)."""
    out = []
    with torch.no_grad():
        for text in TEXTS:
            logits, cache = tiny.run_with_cache(text)
            out.append((tiny.to_tokens(text)[0], logits[0], cache))
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_real_tokens_compute_what_their_prompt_computes_alone(tiny, alone, side):
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(TEXTS, padding_side=side)
    mask = cache.attention_mask
    assert mask is not None and mask.shape == logits.shape[:2]
    worst = 0.0
    for i, (tokens, ref_logits, ref_cache) in enumerate(alone):
        real = mask[i]
        assert real.sum() == len(tokens)
        assert bool(real[-1] if side == "left" else real[0])
        worst = max(worst, (logits[i, real] - ref_logits).abs().max().item())
        for name, ref in ref_cache.items():
            got = cache[name][i]
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, q, k]
                got = got[:, real][:, :, real]
            else:  # [pos, ...]
                got = got[real]
            torch.testing.assert_close(got, ref[0], atol=1e-5, rtol=0, msg=name)
    assert worst <= 1e-5


def test_loss_is_over_real_tokens_weighted_by_count(tiny, alone):
    """The batch loss is the per-prompt losses weighted by their number of predictions."""
    per_prompt, counts = [], []
    for tokens, logits, _ in alone:
        per_prompt.append(F.cross_entropy(logits[:-1], tokens[1:], reduction="none"))
        counts.append(len(tokens) - 1)
    expected = sum(p.sum() for p in per_prompt) / sum(counts)
    for side in ("left", "right"):
        with torch.no_grad():
            loss = tiny(TEXTS, return_type="loss", padding_side=side)
            per_token = tiny(TEXTS, return_type="loss", padding_side=side, loss_per_token=True)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
        _, mask = tiny.to_tokens(TEXTS, padding_side=side, return_attention_mask=True)
        pairs = mask[:, 1:] & mask[:, :-1]
        for i, ref in enumerate(per_prompt):
            torch.testing.assert_close(per_token[i, pairs[i]], ref, atol=1e-5, rtol=0)
            assert (per_token[i, ~pairs[i]] == 0).all()


def test_metric_pos_minus_one_reads_each_rows_last_real_token(tiny, alone):
    answer, wrong = 11, 22
    expected = sum(lg[-1, answer] - lg[-1, wrong] for _, lg, _ in alone) / len(alone)
    for side in ("left", "right"):
        tokens, mask = tiny.to_tokens(TEXTS, padding_side=side, return_attention_mask=True)
        with torch.no_grad():
            logits = tiny(tokens, attention_mask=mask)
        metric = metrics.logit_diff(answer, wrong)
        torch.testing.assert_close(metric(logits, attention_mask=mask), expected, atol=1e-5, rtol=0)
        lengths = [len(t) for t, _, _ in alone]
        last = [lengths[i] - 1 if side == "right" else mask.shape[1] - 1 for i in range(4)]
        assert metric.positions(4, mask.shape[1], attention_mask=mask).tolist() == last
    # hand-made masks: -2 counts back over real tokens only; non-negative pos is a column
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert Metric(sum, pos=-2).positions(3, 5, attention_mask=m).tolist() == [1, 3, 3]
    assert Metric(sum, pos=-1).positions(3, 5).tolist() == [4, 4, 4]  # no mask: as before
    with pytest.raises(IndexError, match="reads padding"):
        Metric(sum, pos=4).positions(3, 5, attention_mask=m)
    with pytest.raises(IndexError, match="real tokens"):
        Metric(sum, pos=-4).positions(3, 5, attention_mask=m)


def _scores_by_hand(pattern: torch.Tensor, tokens: list[int]) -> dict[str, tuple[list, int]]:
    """One prompt's attention mass per head for each detector, summed over the queries
    where it is defined, and the number of those queries: loops, no vectorised masks."""
    n_heads, n = pattern.shape[0], len(tokens)
    out = {}
    rules = {
        "previous_token": lambda q, k: k == q - 1,
        "bos": lambda q, k: k == 0,
        "duplicate_token": lambda q, k: k < q and tokens[k] == tokens[q],
        "induction": lambda q, k: 1 <= k <= q and tokens[k - 1] == tokens[q],
    }
    for name, rule in rules.items():
        mass, count = [0.0] * n_heads, 0
        for q in range(n):
            keys = [k for k in range(q + 1) if rule(q, k)]
            if not keys:
                continue
            count += 1
            for h in range(n_heads):
                mass[h] += sum(pattern[h, q, k].item() for k in keys)
        out[name] = (mass, count)
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_detectors_on_a_padded_batch_equal_the_prompts_alone(tiny, alone, side):
    tokens, mask = tiny.to_tokens(TEXTS, padding_side=side, return_attention_mask=True)
    pooled = head_scores(tiny, tokens, attention_mask=mask)
    stacked = head_scores(tiny, tokens, attention_mask=mask, per_prompt=True)
    assert pooled["induction"].axes == ("layer", "head")
    assert stacked["induction"].axes == ("batch", "layer", "head")
    for layer in range(tiny.cfg.n_layers):
        hand = [
            _scores_by_hand(cache[f"blocks.{layer}.attn.hook_pattern"][0], toks.tolist())
            for toks, _, cache in alone
        ]
        for name in pooled:
            total = torch.tensor([sum(h[name][0][i] for h in hand) for i in range(4)])
            count = sum(h[name][1] for h in hand)
            torch.testing.assert_close(
                pooled[name].values[layer], total / count, atol=1e-5, rtol=0, msg=name
            )
            for b, h in enumerate(hand):
                mass, c = h[name]
                want = torch.tensor(mass) / max(c, 1)
                got = stacked[name].values[b, layer]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{name} {b}")
    # strings are padded and masked for you; the scores do not depend on the side
    from_strings = head_scores(tiny, TEXTS)
    for name in pooled:
        torch.testing.assert_close(
            from_strings[name].values, pooled[name].values, atol=1e-6, rtol=0
        )


def test_unmasked_scores_count_padding_and_masked_do_not(tiny):
    """The bug this guards: pad == BOS, so unmasked padding looks like duplicate BOS tokens."""
    tokens, mask = tiny.to_tokens(TEXTS, padding_side="right", return_attention_mask=True)
    masked = head_scores(tiny, tokens, attention_mask=mask)["duplicate_token"].values
    leaky = head_scores(tiny, tokens)["duplicate_token"].values
    assert (masked - leaky).abs().max() > 1e-3


def test_decompositions_can_mask_the_padding(tiny):
    """With mask_padding, a padded batch's parts are zero at padding and, at real
    positions, equal the parts of each prompt run alone."""
    rows = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12, 13])]
    tokens = torch.full((2, 5), 50256)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, attention_mask=mask)
        parts = cache.decompose_resid(1, "mid", mask_padding=True)
        dla = cache.logit_attribution(7, mask_padding=True)
        assert (parts.values[:, ~mask] == 0).all() and (dla.values[:, ~mask] == 0).all()
        for i, r in enumerate(rows):
            _, alone = tiny.run_with_cache(r[None])
            ref = alone.decompose_resid(1, "mid").values[:, 0]
            torch.testing.assert_close(parts.values[:, i, : len(r)], ref, atol=1e-5, rtol=0)
            ref_dla = alone.logit_attribution(7).values[:, 0]
            torch.testing.assert_close(dla.values[:, i, : len(r)], ref_dla, atol=1e-5, rtol=0)
