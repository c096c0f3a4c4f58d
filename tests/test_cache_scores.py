"""The eviction baselines' scoring and selection (kvslim.cache.methods.evict.scores) on small hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from kvslim.cache.methods.evict.scores import (
    causal_probs,
    check_ratio,
    gather_tokens,
    h2o_scores,
    keep_budget,
    key_norm_scores,
    select_keep,
    snapkv_scores,
    tova_scores,
)
from kvslim.errors import InvalidInput


def _s(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([list(rows)], dtype=torch.float32)  # [1, h, n]


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), float("inf"), "half"])
def test_ratio_outside_unit_interval_refused(bad):
    with pytest.raises(InvalidInput, match=r"\(0, 1\]"):
        check_ratio(bad)


def test_budget_from_ratio_and_tokens():
    assert keep_budget(1000, 0.5) == 500
    assert keep_budget(1001, 0.5) == 501  # ceil
    assert keep_budget(10, 1.0) == 10
    assert keep_budget(3, 0.01) == 1  # never empty
    assert keep_budget(100, 0.125) == 13
    assert keep_budget(100, budget=40) == 40
    with pytest.raises(InvalidInput, match="above the 100 tokens"):
        keep_budget(100, budget=101)
    with pytest.raises(InvalidInput, match="positive"):
        keep_budget(100, budget=-1)


def test_select_keeps_top_scores_sorted():
    scores = _s([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    assert select_keep(scores, 3).tolist() == [[[1, 3, 5]]]


def test_select_per_head_differs():
    scores = _s([1, 0, 0, 2], [0, 3, 2, 0])
    assert select_keep(scores, 2).tolist() == [[[0, 3], [1, 2]]]


def test_select_sinks_and_recent_always_kept():
    scores = _s([0.0, 0.0, 5.0, 4.0, 9.0, 0.0, 0.0])
    # 1 sink (col 0) + 2 recent (cols 5, 6) + the best one of cols 1..4 (col 4)
    assert select_keep(scores, 4, sinks=1, recent=2).tolist() == [[[0, 4, 5, 6]]]
    # the protected sets are cut to the budget: sinks first, then recent
    assert select_keep(scores, 2, sinks=1, recent=2).tolist() == [[[0, 6]]]
    assert select_keep(scores, 1, sinks=3, recent=2).tolist() == [[[0]]]


def test_select_ties_take_the_earlier_token_and_padding_last():
    scores = _s([1.0, 1.0, 1.0, 1.0])
    assert select_keep(scores, 2).tolist() == [[[0, 1]]]
    valid = torch.tensor([[False, False, True, True]])
    assert select_keep(_s([9.0, 9.0, 0.0, 0.0]), 2, valid=valid).tolist() == [[[2, 3]]]


def test_select_budget_at_least_n_keeps_all():
    assert select_keep(_s([3.0, 1.0]), 5).tolist() == [[[0, 1]]]


def test_gather_tokens_per_head():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(1, 2, 4, 1)  # head 0: 0..3, head 1: 4..7
    idx = torch.tensor([[[0, 3], [1, 2]]])
    assert gather_tokens(x, idx)[..., 0].tolist() == [[[0.0, 3.0], [5.0, 6.0]]]


def test_causal_probs_rows_hand_checked():
    # one KV head, one query head, zero queries: uniform over what each query sees
    k = torch.randn(1, 1, 4, 2)
    q = torch.zeros(1, 1, 2, 2)
    p = causal_probs(q, k, scaling=1.0)  # queries at columns 2 and 3
    assert p.shape == (1, 1, 1, 2, 4)
    assert torch.allclose(p[0, 0, 0], torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    p0 = causal_probs(torch.zeros(1, 1, 1, 2), k, scaling=1.0, first=0)
    assert p0[0, 0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_causal_probs_gqa_groups_and_matches_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)  # 2 KV heads, 2 query heads each
    p = causal_probs(q, k, scaling=8 ** -0.5, softcap=5.0)
    # query head 3 belongs to KV head 1; its last query (column 4) sees every key
    logits = (q[0, 3, 2] @ k[0, 1].T) * 8 ** -0.5
    ref = torch.softmax(torch.tanh(logits / 5.0) * 5.0, -1)
    assert torch.allclose(p[0, 1, 1, 2], ref, atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, 2, 3))


def test_snapkv_votes_pooled_on_prefix_only():
    # 1 KV head, 1 query head, window of 2 queries over 6 tokens
    probs = torch.zeros(1, 1, 1, 2, 6)
    probs[..., 0, 2] = 0.5
    probs[..., 1, 2] = 0.25
    probs[..., :, 5] = 0.1  # a window token
    raw = snapkv_scores(probs, kernel=1)
    assert torch.allclose(raw[0, 0], torch.tensor([0, 0, 0.75, 0, 0, 0.2]))
    mx = snapkv_scores(probs, kernel=3, pooling="max")
    assert torch.allclose(mx[0, 0], torch.tensor([0, 0.75, 0.75, 0.75, 0, 0.2]))  # pooled over cols 0..3
    av = snapkv_scores(probs, kernel=3, pooling="avg")
    assert torch.allclose(av[0, 0], torch.tensor([0, 0.25, 0.25, 0.375, 0, 0.2]))  # border: mean over 2 tokens


def test_snapkv_bad_parameters():
    probs = torch.zeros(1, 1, 1, 2, 6)
    with pytest.raises(InvalidInput, match="odd"):
        snapkv_scores(probs, kernel=4)
    with pytest.raises(InvalidInput, match="pooling"):
        snapkv_scores(probs, pooling="median")


def test_tova_averages_over_the_layer_or_the_group():
    probs = torch.zeros(1, 2, 2, 1, 3)  # 2 KV heads x 2 query heads, one query, 3 tokens
    probs[0, 0, :, 0] = torch.tensor([1.0, 0.0, 0.0])
    probs[0, 1, :, 0] = torch.tensor([0.0, 0.0, 1.0])
    layer = tova_scores(probs)
    assert layer.tolist() == [[[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]]]
    assert tova_scores(probs, per_head=True).tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    assert select_keep(layer, 2).tolist() == [[[0, 2], [0, 2]]]


def test_h2o_accumulates_over_queries_and_group():
    probs = torch.zeros(1, 1, 2, 2, 3)
    probs[0, 0, 0, 0, 0] = 1.0
    probs[0, 0, 1, 1, 2] = 0.5
    probs[0, 0, 0, 1, 2] = 0.5
    assert h2o_scores(probs).tolist() == [[[1.0, 0.0, 1.0]]]


def test_key_norm_keeps_low_norm_keys():
    k = torch.tensor([[[[3.0, 4.0], [0.0, 1.0], [1.0, 1.0], [0.0, 10.0]]]])  # norms 5, 1, 1.41, 10
    s = key_norm_scores(k)
    assert torch.allclose(s, torch.tensor([[[-5.0, -1.0, -math.sqrt(2), -10.0]]]))
    assert select_keep(s, 2).tolist() == [[[1, 2]]]
