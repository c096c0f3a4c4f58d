"""Attention of one chunk of queries over a kvslim layer's sinks, block entries and exact tail.

The visibility rule is the one in :mod:`kvslim.cache.layer`. Query heads are grouped per KV head (GQA/MQA) by
folding the ``g`` query heads of a group into the query axis, so K/V are never repeated: ``[b, h, g*q, d]`` against
``[b, h, n, d]``. Top-k block selection (DSA/CSA indexer analogue, DeepSeek-V3.2 report sec. 2.1): the blocks
visible to a query are scored by ``sum_g q_g . k_entry`` and only the best ``topk`` are attended. At decode
(one query) the selected entries are gathered, so the attention reads ``sinks + topk + window`` entries.
Index letters: b batch, h KV head, g group, q query, n entry, d dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["attend_chunk", "grouped_attention"]


def _n_out(layer: Any, t: torch.Tensor) -> torch.Tensor:
    w = layer.spec.window
    if w is None:
        return torch.zeros_like(t)
    return torch.div(t - w + 1 - layer.spec.sinks, layer.m, rounding_mode="floor").clamp_min(0)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    softcap: float | None = None, want_probs: bool = False, may_be_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q [b, hq, s, d]``, ``k/v [b, h, n, d]``, ``mask [b, h|1, s, n]`` bool (True = attend) ->
    (``[b, s, hq, d]``, probabilities ``[b, h, g*s, n]`` when ``want_probs``)."""
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


def attend_chunk(
    layer: Any, q: torch.Tensor, t_cols: torch.Tensor, sinks: tuple, blocks: tuple, tail: tuple,
    scaling: float, softcap: float | None,
) -> torch.Tensor:
    """Attend queries ``q [b, hq, s, d]`` at columns ``t_cols [s]`` over the layer's decoded stores."""
    spec = layer.spec
    b, hq, s, d = q.shape
    h = layer.heads
    dev = q.device
    n_t = _n_out(layer, t_cols)  # [s]
    t1 = int(t_cols[-1])
    ks, vs, ms = [], [], []
    sink_k, sink_v = sinks
    if sink_k is not None:
        cols = torch.arange(sink_k.shape[2], device=dev)
        vis = (cols[None, :] <= t_cols[:, None])[None] & layer.sink_valid[:, None, :]  # [b, s, ns]
        ks.append(sink_k)
        vs.append(sink_v)
        ms.append(vis[:, None])
    n_last = int(n_t[-1])
    if n_last > 0 and blocks[0] is not None:
        bk = blocks[0][:, :, :n_last]
        bv = blocks[1] if callable(blocks[1]) else blocks[1][:, :, :n_last]  # callable: decodes chosen rows
        j = torch.arange(n_last, device=dev)
        vis = (j[None, :] < n_t[:, None])[None] & layer.blk_valid[:, None, :n_last]  # [b, s, n]
        vis = vis[:, None].expand(b, h, s, n_last)
        if spec.topk and n_last > spec.topk:
            g = hq // h
            scores = torch.einsum("bhgsd,bhnd->bhsn", q.reshape(b, h, g, s, d).float(), bk.float())
            scores = scores.masked_fill(~vis, float("-inf"))
            top = scores.topk(spec.topk, dim=-1)
            if s == 1:  # decode: gather the selected entries only
                idx = top.indices[:, :, 0]  # [b, h, k]
                gather = idx[..., None].expand(b, h, spec.topk, d)
                bk = bk.gather(2, gather)
                bv = bv(idx) if callable(bv) else bv.gather(2, gather)
                vis = torch.isfinite(top.values)  # [b, h, 1, k]
            else:
                sel = torch.zeros_like(vis).scatter_(-1, top.indices, True)
                vis = vis & sel
        ks.append(bk)
        vs.append(bv)
        ms.append(vis)
    tail_k, tail_v = tail
    obs_slice = None
    if tail_k is not None:
        lo = spec.sinks + int(n_t[0]) * layer.m
        lo = max(lo, layer.tail_start)
        a, e = lo - layer.tail_start, t1 + 1 - layer.tail_start
        if e > a:
            cols = torch.arange(lo, t1 + 1, device=dev)
            first = spec.sinks + n_t * layer.m
            vis = (cols[None, :] >= first[:, None]) & (cols[None, :] <= t_cols[:, None])
            vis = vis[None] & layer.tail_valid[:, None, a:e]
            ks.append(tail_k[:, :, a:e])
            vs.append(tail_v[:, :, a:e])
            ms.append(vis[:, None])
            obs_slice = (a, e)
    n_before_tail = sum(k.shape[2] for k in ks[:-1]) if obs_slice else 0
    if s == 1 and not layer.has_padding:
        mask = None  # one query, no padding: everything assembled above is visible by construction
    else:
        heads = max(m.shape[1] for m in ms)
        mask = torch.cat([m.expand(b, heads, s, m.shape[-1]) for m in ms], dim=-1)
    K, V = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, dim=2), torch.cat(vs, dim=2))
    want = layer.obs is not None
    out, probs = grouped_attention(q, K, V, mask, scaling, softcap, want_probs=want, may_be_empty=layer.has_padding)
    if want and obs_slice is not None:
        a, e = obs_slice
        layer.obs[:, :, a:e] += probs[..., n_before_tail:].sum(2)
    return out
