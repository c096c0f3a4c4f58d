"""Grouped attention of queries over one layer's assembled keys and values (GQA/MQA without repeating K/V).

Query heads are grouped per KV head by folding the ``g`` query heads of a group into the query axis:
``[b, h, g*s, d]`` against ``[b, h, n, d]``. Without a softcap and without probabilities requested, torch's sdpa runs
with an additive float mask; otherwise an explicit softmax (Gemma 2/3 logit softcapping, observed attention).
Index letters: b batch, h KV head, g group, s query, n entry, d dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_attention"]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    softcap: float | None = None, want_probs: bool = False, may_be_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q [b, hq, s, d]``, ``k/v [b, h, n, d]``, ``mask [b, h|1, s, n]`` bool (True = attend) ->
    (``[b, s, hq, d]``, probabilities ``[b, h, g*s, n]`` when ``want_probs``). Query heads are grouped per KV head
    by folding the ``g`` heads of a group into the query axis, so K/V are never repeated."""
    b, hq, s, d = q.shape
    h = k.shape[1]
    g = hq // h
    qg = q.reshape(b, h, g * s, d)
    if mask is not None:
        mask = mask[:, :, None].expand(b, mask.shape[1], g, s, mask.shape[-1]).reshape(b, mask.shape[1], g * s, -1)
        if may_be_empty:  # rows with nothing visible (padding queries): attend to everything, output unused
            mask = mask | ~mask.any(-1, keepdim=True)
    probs = None
    if softcap is None and not want_probs:
        bias = None
        if mask is not None:  # an additive float mask: CPU sdpa runs it faster than a boolean one
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias, scale=scaling)
    else:
        logits = torch.matmul(qg, k.transpose(-1, -2)).float() * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)
    return out.reshape(b, hq, s, -1).transpose(1, 2), probs
