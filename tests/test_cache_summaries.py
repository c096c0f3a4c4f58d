"""Block summaries and selection: the bounding box bounds q.k, every block is selected when k >= blocks."""

from __future__ import annotations

import pytest
import torch

from kvslim.cache.methods.recall.summaries import score_blocks, select_blocks, summarize
from kvslim.errors import InvalidInput


def _exact_block_max(q, keys, gqa):
    """max over a block's tokens of q.k per query head, combined over the group like score_blocks."""
    b, hq, s, d = q.shape
    h = keys.shape[1]
    per = torch.einsum("bhgsd,bhnmd->bhgsnm", q.reshape(b, h, hq // h, s, d), keys)
    if gqa == "max":
        return per.amax(-1).amax(2)
    return per.sum(2).amax(-1)  # the group's summed logit of the best token


@pytest.mark.parametrize("gqa", ["max", "sum"])
def test_bbox_upper_bounds_every_key(gqa):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 7, 8, 16, generator=g) * torch.rand(16, generator=g) * 3
    q = torch.randn(2, 6, 5, 16, generator=g)
    bound = score_blocks("bbox", q, summarize("bbox", keys), gqa)
    exact = _exact_block_max(q, keys, gqa)
    assert bound.shape == (2, 3, 5, 7)
    assert (bound >= exact - 1e-4).all()
    assert (bound > exact + 1e-3).any()  # a bound, not the exact value


def test_reps_with_every_key_is_exact():
    keys = torch.randn(1, 2, 4, 6, 8)
    q = torch.randn(1, 4, 3, 8)
    got = score_blocks("reps", q, summarize("reps", keys, r=6), "max")
    assert torch.allclose(got, _exact_block_max(q, keys, "max"), atol=1e-5)


def test_reps_start_from_the_largest_key_and_spread():
    keys = torch.zeros(1, 1, 1, 4, 2)
    keys[0, 0, 0] = torch.tensor([[1.0, 0], [0.9, 0.1], [-1, 0], [5, 0]])
    reps = summarize("reps", keys, r=2)[0, 0, 0]
    assert torch.equal(reps, torch.tensor([[5.0, 0], [-1, 0]]))


def test_mean_and_padding():
    keys = torch.arange(8.0).reshape(1, 1, 2, 4, 1)
    valid = torch.tensor([[[True, True, False, False], [False] * 4]])
    summ = summarize("mean", keys, valid)
    assert summ[0, 0, 0, 0, 0] == 0.5 and summ[0, 0, 1, 0, 0] == 0.0
    box = summarize("bbox", keys, valid)
    assert box[0, 0, 0, :, 0].tolist() == [0.0, 1.0]


def test_every_block_selected_when_k_covers_them():
    scores = torch.randn(2, 3, 4, 9)
    vis = torch.ones(1, 1, 4, 9, dtype=torch.bool)
    vis[..., 0, 5:] = False  # the first query sees 5 blocks
    idx, ok = select_blocks(scores, vis, k=9)
    assert idx.shape == (2, 3, 4, 9)
    assert ok[..., 0, :].sum(-1).eq(5).all() and ok[..., 1:, :].all()
    assert torch.equal(idx[..., 0, :5], torch.arange(5).expand(2, 3, 5))


def test_topk_with_neighbours():
    scores = torch.zeros(1, 1, 1, 10)
    scores[..., 4] = 5.0
    scores[..., 9] = 4.0
    vis = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    idx, ok = select_blocks(scores, vis, k=2, nbr=1)
    assert idx[ok].tolist() == [3, 4, 5, 8, 9]
    idx, ok = select_blocks(scores, vis, k=1)
    assert idx[ok].tolist() == [4]
    with pytest.raises(InvalidInput):
        select_blocks(scores, vis, k=0)


def test_union_takes_each_heads_top_blocks_in_turn():
    """Head 0 scores on a scale 100x head 1's: max lets head 0 fill the top 2; union gives each head its best."""
    per = torch.tensor([[500.0, 400.0, 300.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0, 5.0]])  # [g=2, n=5] -> one KV head
    keys = torch.eye(5)[None, None, :, None, :]  # [b, h, n, m=1, d=5]: block j's key is e_j
    q = per[None, :, None, :]  # [b, h*g, s, d]: q . k_j = per[g, j]
    summ = summarize("mean", keys)
    vis = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    top_max = select_blocks(score_blocks("mean", q, summ, "max"), vis, k=2)[0]
    top_union = select_blocks(score_blocks("mean", q, summ, "union"), vis, k=2)[0]
    assert top_max.flatten().tolist() == [0, 1]
    assert top_union.flatten().tolist() == [0, 4]  # ascending: head 0's best (0) and head 1's best (4)
    third = select_blocks(score_blocks("mean", q, summ, "union"), vis, k=3)[0]
    assert third.flatten().tolist() == [0, 1, 4]  # then the second ranks: block 1 (head 0) beats 3 by the max score


def test_union_with_one_head_per_group_is_max():
    g = torch.Generator().manual_seed(2)
    summ = summarize("bbox", torch.randn(1, 2, 6, 4, 8, generator=g))
    q = torch.randn(1, 2, 3, 8, generator=g)
    assert torch.equal(score_blocks("bbox", q, summ, "union"), score_blocks("bbox", q, summ, "max"))
