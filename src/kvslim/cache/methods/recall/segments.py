"""Exact attention over K/V given in segments (read one at a time), merged by log-sum-exp.

``attend_segment`` attends queries to one segment and returns the partial output with its log-sum-exp;
``merge`` combines partials into the attention over the union of the segments, exactly (up to float rounding).
Used to attend densely over a cold tier read chunk by chunk. ``block_lse`` gives one query's exact log-sum-exp per
block of a segment (what a tiered cache pins after a prefill). Index letters: b batch, h KV head, g query heads
per KV head, s queries, n keys, d dim.
"""

from __future__ import annotations

import torch

__all__ = ["attend_segment", "block_lse", "merge"]


def attend_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    softcap: float | None = None, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [b, h*g, s, d]``, ``k/v [b, h, n, d]``, ``mask [b|1, h|1, s, n]`` (True = attend), ``bias [b|1, 1, 1, n]``
    added to the (capped) logits ->
    (``out [b, h*g, s, d]`` float32, ``lse [b, h*g, s]``; ``-inf`` where a query sees nothing here)."""
    b, hq, s, d = q.shape
    h = k.shape[1]
    g = hq // h
    logits = torch.matmul(q.float().reshape(b, h, g * s, d), k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        logits = logits + bias.float().reshape(bias.shape[0], 1, 1, -1)
    if mask is not None:
        m = mask.expand(b, h, s, k.shape[2])[:, :, None].expand(b, h, g, s, k.shape[2])
        logits = logits.masked_fill(~m.reshape(b, h, g * s, -1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse).nan_to_num(0.0)
    out = torch.matmul(p, v.float())
    return out.reshape(b, hq, s, -1), lse.reshape(b, hq, s)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Partials ``(out, lse)`` -> the attention over every segment ``[b, h*g, s, d]`` (float32)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [P, b, hq, s]
    total = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - total).nan_to_num(0.0)
    return sum(w[i][..., None] * parts[i][0] for i in range(len(parts)))


def block_lse(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, m: int, scaling: float,
              softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """One query per head ``q [b, h*g, 1, d]`` against ``k [b, h, j*m, d]`` in blocks of ``m`` tokens
    (``valid [b, j*m]``) -> ``[b, h, j]``: per KV head the largest over its ``g`` query heads of the log-sum-exp of
    the logits over each block's valid tokens (``-inf`` for a block without one)."""
    b, hq, _, d = q.shape
    h, n = k.shape[1], k.shape[2]
    logits = torch.matmul(q.float().reshape(b, h, hq // h, d), k.float().transpose(-1, -2)) * scaling  # [b, h, g, n]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.logsumexp(logits.reshape(b, h, hq // h, n // m, m), -1).amax(2)
