"""V4 lightning indexer (paper §2.3.1 eqs. 13-17): picks the top-k CSA entries per query.

Keys: its own overlapping compressor at ``index_head_dim`` (same windows as the CSA compressor), kept for the whole
context (that is the indexer cache: N/m keys). Queries: ``q_b_proj(q_residual)`` -> [B, S, H_I, d_I] with RoPE
(compress table) at the query position. Score ``I(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . k_s) / sqrt(d_I)`` with
``w = weights_proj(x) / sqrt(H_I)``; entries not yet closed (``s >= (t+1) // m``) score -inf; the top
``min(k, N)`` are returned, with -1 marking picks that are not causal (early queries with fewer than k entries).
Exact ties at the top-k boundary go to the earliest entries (:func:`~kvslim.nn._common.topk_first`), so decode and
prefill pick alike; transformers' ``torch.topk`` breaks such ties in a width-dependent order.
The FP4 / Hadamard simulation of the reference kernels is not applied (transformers does not either).
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.nn._common import Rotary, lightning_scores, rope_interleaved, topk_first
from kvslim.nn.v4_compressor import Compressor, CompressorState

__all__ = ["Indexer"]


class Indexer(nn.Module):
    """Lightning indexer of one CSA layer. ``compressor`` holds its key compressor (``kv_proj`` 2*d_I wide)."""

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int, rate: int,
                 rotary: Rotary, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.rate = n_heads, head_dim, topk, rate
        self.compressor = Compressor(hidden_size, head_dim, rate, overlap=True, rotary=rotary, eps=eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.softmax_scale = head_dim**-0.5
        self.weights_scaling = n_heads**-0.5

    @torch.no_grad()
    def select(self, hidden: torch.Tensor, q_residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor, state: CompressorState, chunk: int = 256) -> torch.Tensor:
        """Update the key store with ``hidden`` [B, S, D] and return top-k entry indices [B, S, k'] (-1 = none).

        ``cos``, ``sin`` [S, r/2]: the layer's (compress) RoPE table at ``positions``, also the queries' table here
        (as in the V3.2 indexer, the caller computes them once for the layer).

        ``k' = min(topk, N)`` with N the number of keys after the update. Work per query: O(N * H_I * d_I).
        """
        b, s, _ = hidden.shape
        self.compressor.update(hidden, state)
        keys = state.read_all(b, self.head_dim).float()  # [B, N, d_I]
        n = keys.shape[1]
        k = min(self.topk, n)
        if k == 0:
            return torch.empty((b, s, 0), dtype=torch.long)
        q = self.q_b_proj(q_residual).view(b, s, self.n_heads, self.head_dim)
        q = rope_interleaved(q, cos[:, None], sin[:, None]).float()
        w = self.weights_proj(hidden).float() * self.weights_scaling  # [B, S, H]
        threshold = (positions + 1) // self.rate  # [S]
        keys_t = keys.transpose(-1, -2)  # [B, d, N] (a view)
        if s == 1 and int(threshold[0]) == n:  # decode: every key is closed, no mask, no padding
            return topk_first(lightning_scores(q, w, keys_t, self.softmax_scale), k)
        out = []
        for c0 in range(0, s, chunk):
            c1 = min(s, c0 + chunk)
            thr = threshold[c0:c1].view(1, -1, 1)
            n_vis = int(threshold[c1 - 1])  # entries closed for the block's last query; later ones score -inf
            pad = torch.full((b, c1 - c0, k), -1, dtype=torch.long)
            if n_vis == 0:
                out.append(pad)
                continue
            scores = lightning_scores(q[:, c0:c1], w[:, c0:c1], keys_t[..., :n_vis], self.softmax_scale)
            scores = scores.masked_fill_(torch.arange(n_vis).view(1, 1, -1) >= thr, float("-inf"))
            idx = topk_first(scores, min(k, n_vis))
            pad[..., : idx.shape[-1]] = torch.where(idx >= thr, torch.full_like(idx, -1), idx)
            out.append(pad)
        return torch.cat(out, 1)
