"""Block summaries, block scores and top-k block selection (the hot index of a tiered cache).

A block is ``m`` consecutive (post-RoPE) keys of one KV head. Its summary is ``v`` vectors of the key dim:

* ``mean`` (v = 1): the mean key; score ``q . mean`` (InfLLM-like, with one representative);
* ``bbox`` (v = 2): per-channel minimum and maximum; score ``sum_d max(q_d min_d, q_d max_d)``, an upper bound on
  ``q . k`` for every key of the block (Quest, Tang et al. 2024);
* ``reps`` (v = r): ``r`` representative keys picked by farthest-point sampling, starting from the key with the
  largest norm; score ``max_r q . k_r`` (exact when ``r >= m``).

GQA: each query head scores every block; the ``g`` heads of a KV group are combined by ``max`` (the best head's
score), ``sum`` (for ``bbox`` an upper bound on the group's summed logits) or ``union`` (rank by rank: every head's
best block first, then every head's second best, ..., ties by the ``max`` score; so a head whose scores run on a
smaller scale still gets its own top blocks into the group's top ``k``, which ``max`` does not promise). Selection takes, per KV head and
query, the ``k`` visible blocks of highest score, optionally with ``nbr`` neighbours on each side (still visible
ones only), and returns them as a fixed-width index with an ``ok`` flag (entries past the visible count are
filler). Index letters: b batch, h KV head, g query heads per KV head, s queries, n blocks, m block tokens,
v vectors per summary, d dim.
"""

from __future__ import annotations

import torch

from ....errors import InvalidInput

__all__ = ["GQA_MODES", "SUMMARIES", "score_blocks", "select_blocks", "summarize", "vectors_per_block"]

SUMMARIES = ("mean", "bbox", "reps")
GQA_MODES = ("max", "sum", "union")


def vectors_per_block(kind: str, r: int = 2) -> int:
    if kind not in SUMMARIES:
        raise InvalidInput(f"summary must be one of {', '.join(SUMMARIES)}, got {kind!r}")
    return {"mean": 1, "bbox": 2, "reps": r}[kind]


def _farthest_points(k: torch.Tensor, valid: torch.Tensor, r: int) -> torch.Tensor:
    """``k [b, h, n, m, d]``, ``valid [b, n, m]`` -> ``r`` keys per block ``[b, h, n, r, d]``."""
    b, h, n, m, d = k.shape
    vm = valid[:, None].expand(b, h, n, m)
    norms = k.norm(dim=-1).masked_fill(~vm, -1.0)
    first = norms.argmax(-1)  # [b, h, n]
    picks = [first]
    gather = lambda i: k.gather(3, i[..., None, None].expand(b, h, n, 1, d))  # noqa: E731
    dist = (k - gather(first)).norm(dim=-1).masked_fill(~vm, -1.0)  # distance to the nearest pick
    for _ in range(1, r):
        nxt = dist.argmax(-1)
        picks.append(nxt)
        dist = torch.minimum(dist, (k - gather(nxt)).norm(dim=-1).masked_fill(~vm, -1.0))
    idx = torch.stack(picks, -1)  # [b, h, n, r]
    return k.gather(3, idx[..., None].expand(b, h, n, r, d))


def summarize(kind: str, keys: torch.Tensor, valid: torch.Tensor | None = None, r: int = 2) -> torch.Tensor:
    """Summaries ``[b, h, n, v, d]`` of blocks ``keys [b, h, n, m, d]``; ``valid [b, n, m]`` masks padding tokens
    (a block with no valid token gets zeros and must be masked by the caller)."""
    vectors_per_block(kind, r)
    b, h, n, m, d = keys.shape
    if valid is None:
        valid = torch.ones(b, n, m, dtype=torch.bool, device=keys.device)
    k = keys.float()
    vm = valid[:, None, :, :, None]  # [b, 1, n, m, 1]
    if kind == "mean":
        cnt = valid.sum(-1).clamp_min(1)[:, None, :, None, None]
        out = (k * vm).sum(3, keepdim=True) / cnt
    elif kind == "bbox":
        lo = k.masked_fill(~vm, float("inf")).amin(3, keepdim=True)
        hi = k.masked_fill(~vm, float("-inf")).amax(3, keepdim=True)
        out = torch.cat([lo, hi], 3)
    else:
        out = _farthest_points(k, valid, r)
    empty = ~valid.any(-1)  # [b, n]
    return out.masked_fill(empty[:, None, :, None, None], 0.0)


def score_blocks(kind: str, q: torch.Tensor, summ: torch.Tensor, gqa: str = "max") -> torch.Tensor:
    """Scores ``[b, h, s, n]`` of queries ``q [b, h*g, s, d]`` against summaries ``summ [b, h, n, v, d]``."""
    if gqa not in GQA_MODES:
        raise InvalidInput(f"gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    b, hq, s, d = q.shape
    h = summ.shape[1]
    qg = q.float().reshape(b, h, hq // h, s, d)
    sf = summ.float()
    if kind == "bbox":
        lo, hi = sf[:, :, :, 0], sf[:, :, :, 1]  # [b, h, n, d]
        pos = qg.clamp_min(0)
        neg = qg.clamp_max(0)
        per = torch.einsum("bhgsd,bhnd->bhgsn", pos, hi) + torch.einsum("bhgsd,bhnd->bhgsn", neg, lo)
    else:
        per = torch.einsum("bhgsd,bhnvd->bhgsnv", qg, sf).amax(-1)  # mean: v = 1
    if gqa == "sum":
        return per.sum(2)
    best = per.amax(2)
    if gqa == "max" or per.shape[2] == 1:
        return best
    return _union_scores(per, best)


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, 0 = largest (ties by index)."""
    order = x.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))


def _union_scores(per: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """``union`` scores ``[b, h, s, n]`` from per-head scores ``per [b, h, g, s, n]``: a block's best rank over the
    group's heads first, its rank under ``best`` (the max) second, so the top ``k`` of the result take each head's
    top blocks in turn. Non-positive, larger is better; ``-inf`` where ``best`` is (a block no head can see)."""
    n = per.shape[-1]
    first = _rank(per).amin(2)  # [b, h, s, n]
    key = -(first * n + _rank(best)).to(torch.float32)
    return key.masked_fill(torch.isneginf(best), float("-inf"))


def select_blocks(
    scores: torch.Tensor, visible: torch.Tensor, k: int, nbr: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` visible blocks (+ ``nbr`` neighbours each side) of ``scores [b, h, s, n]`` under
    ``visible [b|1, h|1, s, n]`` -> ``(idx [b, h, s, K], ok [b, h, s, K])`` with ``K = min(n, k (2 nbr + 1))``,
    indices ascending among the ``ok`` ones. ``k >= n`` selects every visible block."""
    b, h, s, n = scores.shape
    visible = visible.expand(b, h, s, n)
    if k <= 0 or n == 0:
        raise InvalidInput(f"select_blocks needs k >= 1 and at least one block (k={k}, n={n})")
    masked = scores.masked_fill(~visible, float("-inf"))
    kk = min(k, n)
    top = masked.topk(kk, dim=-1)
    sel = torch.zeros_like(visible).scatter_(-1, top.indices, torch.isfinite(top.values))
    if nbr > 0:
        base = sel.clone()
        for o in range(1, min(nbr, n - 1) + 1):  # a neighbour farther than n - 1 blocks is no block
            sel[..., o:] |= base[..., :-o]
            sel[..., :-o] |= base[..., o:]
        sel &= visible
    width = min(n, kk * (2 * nbr + 1))
    # selected blocks first, in ascending order: key = selected * (n + 1) - index
    order = sel.float() * (n + 1) - torch.arange(n, device=scores.device, dtype=torch.float32)
    idx = order.topk(width, dim=-1).indices
    ok = sel.gather(-1, idx)
    return idx, ok
