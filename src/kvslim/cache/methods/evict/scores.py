"""Token scores and keep-sets of the eviction baselines (SnapKV, TOVA, H2O, key-norm), as pure torch functions.

Every method reduces, per layer and KV head, a score per held token to a keep-set of exactly ``budget`` indices:
the first ``sinks`` tokens and the last ``recent`` tokens are always kept (where the method has them), the rest of
the budget goes to the best-scoring tokens in between (:func:`select_keep`). The scores:

* SnapKV (Li et al. 2024, arXiv:2404.14469, sec. 4): the attention of the last ``window`` prompt queries (the
  observation window), summed over those queries, pooled along the tokens (max or average, kernel ``kernel``) so
  that a kept token brings its neighbours; the window itself is kept.
* TOVA (Oren et al. 2024, arXiv:2401.06104, sec. 3.3): the attention of the current query only, averaged over the
  heads of the layer (the paper keeps one token set for all heads); the lowest is evicted, at every step.
* H2O (Zhang et al. 2023, arXiv:2306.14048, sec. 3): attention accumulated over every query so far ("heavy
  hitters"), plus a window of recent tokens.
* key-norm (Devoto et al. 2024, arXiv:2406.11430): keys with a LOW L2 norm draw high attention, so the score is
  ``-||k||``. RoPE is a rotation, so pre- and post-RoPE keys have the same norm.

GQA: the ``g`` query heads sharing a KV head are folded into one score per KV head (sum for accumulated attention,
mean for the rest). Index letters: b batch, h KV head, g query heads per KV head, s queries, n tokens, d dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ....errors import InvalidInput

__all__ = [
    "check_ratio",
    "keep_budget",
    "select_keep",
    "gather_tokens",
    "causal_probs",
    "snapkv_scores",
    "tova_scores",
    "h2o_scores",
    "key_norm_scores",
]

POOLINGS = ("max", "avg")


def check_ratio(ratio: float, what: str = "keep ratio") -> float:
    """Refuse a keep ratio outside (0, 1] (NaN and infinities included)."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise InvalidInput(f"{what} must be in (0, 1] (1 keeps every token), got {ratio!r}")
    return float(ratio)


def keep_budget(n: int, ratio: float = 1.0, budget: int = 0) -> int:
    """Tokens kept out of ``n``: ``budget`` when given (> 0), else ``ceil(ratio * n)``; always in ``[1, n]``.

    A budget above ``n`` is refused: the context is shorter than what the cache was asked to keep.
    """
    if budget < 0:
        raise InvalidInput(f"token budget must be positive (0: use the keep ratio), got {budget}")
    if budget:
        if budget > n:
            raise InvalidInput(f"token budget {budget} is above the {n} tokens of the context: give a budget <= {n}")
        return budget
    check_ratio(ratio)
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


def select_keep(
    scores: torch.Tensor, budget: int, sinks: int = 0, recent: int = 0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices ``[b, h, budget]`` (ascending) of the tokens to keep, from ``scores [b, h, n]`` (higher = keep).

    The first ``min(sinks, budget)`` tokens and then the last ``min(recent, budget - sinks)`` are kept whatever
    their score; the remaining budget goes to the highest scores between them (ties: the earlier token).
    ``valid [b, n]`` or ``[b, h, n]`` (False = padding) ranks padding last. ``budget >= n`` keeps everything.
    """
    b, h, n = scores.shape
    if budget >= n:
        return torch.arange(n, device=scores.device).expand(b, h, n).clone()
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    ns = min(sinks, budget)
    nr = min(recent, budget - ns)
    lo, hi = ns, n - nr
    parts = [torch.arange(ns, device=scores.device).expand(b, h, ns)]
    free = budget - ns - nr
    if free:
        mid = scores[..., lo:hi].float()
        if valid is not None:  # [b, n] or per head [b, h, n]
            vh = valid[:, None] if valid.ndim == 2 else valid
            mid = mid.masked_fill(~vh[..., lo:hi], float("-inf"))
        # stable ranking: sort descending, ties keep their order (earlier token first)
        order = torch.sort(mid, dim=-1, descending=True, stable=True).indices[..., :free]
        parts.append(order + lo)
    parts.append(torch.arange(hi, n, device=scores.device).expand(b, h, nr))
    return torch.sort(torch.cat(parts, dim=-1), dim=-1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [b, h, k]`` of ``x [b, h, n, ...]`` -> ``[b, h, k, ...]`` (per batch row and head)."""
    shape = (*idx.shape, *x.shape[3:])
    return x.gather(2, idx.reshape(*idx.shape, *([1] * (x.ndim - 3))).expand(shape))


def causal_probs(
    q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None,
    valid: torch.Tensor | None = None, first: int | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[b, h, g, s, n]`` (float32) of queries ``q [b, h*g, s, d]`` over keys ``k [b, h, n, d]``.

    Query ``i`` sits at column ``first + i`` (default ``first = n - s``: the queries are the last ``s`` tokens)
    and sees the columns up to its own. ``valid [b, n]`` or ``[b, h, n]`` (False = padding) hides padding columns.
    """
    b, hq, s, d = q.shape
    h, n = k.shape[1], k.shape[2]
    first = n - s if first is None else first
    if first < 0 or first + s > n:
        raise ValueError(f"queries at columns {first}..{first + s - 1} but only {n} keys")
    qg = q.reshape(b, h, hq // h, s, d).float()
    logits = torch.einsum("bhgsd,bhnd->bhgsn", qg, k.float()) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    cols = torch.arange(n, device=q.device)
    mask = cols[None, :] <= (first + torch.arange(s, device=q.device))[:, None]  # [s, n]
    if valid is not None:  # [b, n] or per head [b, h, n]
        vh = valid[:, None] if valid.ndim == 2 else valid
        mask = mask[None, None] & vh[:, :, None, :]  # [b, h|1, s, n]
        mask = mask | ~mask.any(-1, keepdim=True)  # a padding query sees everything (its output is unused)
        mask = mask[:, :, None]
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def snapkv_scores(probs: torch.Tensor, kernel: int = 7, pooling: str = "max") -> torch.Tensor:
    """SnapKV votes ``[b, h, n]`` from the observation window's probabilities ``probs [b, h, g, s, n]``.

    Votes are the attention each token gets from the ``s`` window queries (summed over them, averaged over the
    group's query heads); on the prefix ``[0, n - s)`` they are pooled with a stride-1 window of ``kernel``
    tokens (``max`` or ``avg``, same length out), the window's own tokens keep their raw votes (they are kept
    anyway: select them with ``recent = s``).
    """
    if pooling not in POOLINGS:
        raise InvalidInput(f"snapkv pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if kernel < 1 or kernel % 2 == 0:
        raise InvalidInput(f"snapkv kernel must be an odd number >= 1 (the pooling is centred), got {kernel}")
    s, n = probs.shape[-2], probs.shape[-1]
    votes = probs.sum(-2).mean(2)  # [b, h, n]
    prefix = votes[..., : n - s]
    if kernel > 1 and prefix.shape[-1]:
        b, h, m = prefix.shape
        x = prefix.reshape(b * h, 1, m)
        pad = kernel // 2
        if pooling == "max":
            x = F.max_pool1d(F.pad(x, (pad, pad), value=float("-inf")), kernel, stride=1)
        else:  # average over the tokens that exist (the border windows are shorter)
            ones = torch.ones_like(x)
            x = F.avg_pool1d(F.pad(x, (pad, pad)), kernel, stride=1) / F.avg_pool1d(F.pad(ones, (pad, pad)), kernel, stride=1)
        prefix = x.reshape(b, h, m)
    return torch.cat([prefix, votes[..., n - s :]], dim=-1)


def tova_scores(probs: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """TOVA scores ``[b, h, n]`` from the current query's probabilities ``probs [b, h, g, 1, n]`` (or ``s`` queries,
    of which only the last counts): averaged over every head of the layer, the same for all KV heads, as the paper
    does; ``per_head`` averages within each KV head's group only."""
    last = probs[..., -1, :]  # [b, h, g, n]
    if per_head:
        return last.mean(2)
    return last.mean((1, 2), keepdim=False)[:, None].expand(last.shape[0], last.shape[1], last.shape[-1])


def h2o_scores(probs: torch.Tensor) -> torch.Tensor:
    """Accumulated attention ``[b, h, n]``: ``probs [b, h, g, s, n]`` summed over the queries and the group's heads.
    Add the result of successive chunks (or decode steps) to accumulate over every query seen."""
    return probs.sum((2, 3))


def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    """``-||k||_2`` per token ``[b, h, n]`` from keys ``k [b, h, n, d]``: low-norm keys score high (are kept)."""
    return -torch.linalg.vector_norm(k.float(), dim=-1)
