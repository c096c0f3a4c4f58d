"""Small shared pieces of the native DeepSeek modules: RMSNorm, RoPE tables and rotations, a growable store.

RoPE conventions (all three appear in DeepSeek code and must not be mixed up):
- ``rope_half``: half-split pairs ``(x_i, x_{i+d/2})`` (``rotate_half``), used by the V3.2 indexer on its *leading*
  ``rd`` dims;
- ``rope_deinterleave``: interleaved pairs ``(x_{2i}, x_{2i+1})`` whose output is laid out de-interleaved
  ``[evens' | odds']`` (transformers' ``apply_rotary_pos_emb_interleave``, V3 / V3.2 MLA with ``rope_interleave``);
- ``rope_interleaved``: interleaved pairs kept in place on the *trailing* ``rd`` dims, computed in fp32 (V4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "Rotary", "rope_half", "rope_deinterleave", "rope_interleaved", "GrowBuffer", "gather_rows", "topk_first",
           "lightning_scores"]

SCORE_BLOCK_BYTES = 1 << 22  # per-head score block of the lightning indexers (fits a 4 MiB L2)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in fp32; ``weight`` [d] (or none when ``weighted=False``).

    ``cast_after_weight=True`` multiplies by the weight in fp32 and casts once (V4); ``False`` casts then multiplies
    (V3 / V3.2). Identical in fp32.
    """

    def __init__(self, dim: int, eps: float = 1e-6, weighted: bool = True, cast_after_weight: bool = False):
        super().__init__()
        self.eps = eps
        self.cast_after_weight = cast_after_weight
        self.weight = nn.Parameter(torch.ones(dim)) if weighted else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)  # one fused op (fp32)
        if self.weight is None:
            return h.to(x.dtype)
        if self.cast_after_weight:
            return (self.weight * h).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """A RoPE table: ``inv_freq`` [rd/2] (fp32 buffer) and a cos/sin multiplier ``scaling`` (YaRN's mscale; 1.0 plain).

    ``Rotary.default(rd, theta)`` builds plain RoPE; :func:`kvslim.nn.from_transformers` copies transformers' own
    table (YaRN included) so positions match bit for bit.
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.scaling = float(scaling)

    @classmethod
    def default(cls, rope_dim: int, theta: float) -> Rotary:
        return cls(1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim)))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``positions.shape + (rd/2,)``, fp32."""
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on all of ``x`` [..., rd]; cos/sin [..., rd/2] broadcastable to x's leading dims."""
    c = torch.cat((cos, cos), -1).to(x.dtype)
    s = torch.cat((sin, sin), -1).to(x.dtype)
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), -1)
    return x * c + rot * s


def rope_deinterleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE on all of ``x`` [..., rd], output laid out ``[rotated evens | rotated odds]``."""
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4 RoPE: interleaved pairs on the trailing ``2 * cos.shape[-1]`` dims of ``x``, in fp32, pairs kept in place.

    Same arithmetic as transformers' ``x * cos + rotate_half(x) * sin`` per element (a + (-b) == a - b in IEEE).
    """
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    x0, x1 = rope[..., 0::2], rope[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2).to(x.dtype)
    return torch.cat((nope, out), -1)


def lightning_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, scale: float) -> torch.Tensor:
    """Lightning-indexer scores ``I[b, t, s] = sum_h w[b, t, h] * ReLU(q[b, t, h] . k[b, s]) * scale`` -> [B, C, N]
    for q [B, C, H, d] (fp32), w [B, C, H], keys_t [B, d, N] (V3.2 and V4 indexers).

    The [rows * H, N] block of per-head scores is the big intermediate (quadratic over a prefill), so it is made
    in blocks of queries of about ``SCORE_BLOCK_BYTES`` (cache-sized): one matmul, an in-place ReLU, and the head
    sum as a batched [1, H] x [H, N] product. Decode (C = 1) and prefill run the same per-row arithmetic.
    """
    b, c, h, d = q.shape
    n = keys_t.shape[-1]
    out = q.new_empty((b, c, n))
    w = w * scale
    rows = max(1, SCORE_BLOCK_BYTES // (h * max(n, 1) * 4))
    for bi in range(b):
        for r0 in range(0, c, rows):
            r1 = min(c, r0 + rows)
            per_head = torch.mm(q[bi, r0:r1].reshape(-1, d), keys_t[bi]).relu_().view(r1 - r0, h, n)
            torch.bmm(w[bi, r0:r1].unsqueeze(1), per_head, out=out[bi, r0:r1].unsqueeze(1))
    return out


def topk_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores of each row [..., n] -> [..., k]; among scores equal to the k-th largest,
    the earliest entries win (the order of the returned indices is unspecified).

    ``torch.topk`` breaks such ties in an order that depends on the row's width, so a decode step (one row of the
    entries so far) and a prefill (rows as wide as the whole call) could pick different entries. Exact ties are
    common in lightning-indexer scores: ``sum_h w_h ReLU(.)`` is exactly 0 for every entry whose ReLUs all vanish,
    which with few indexer heads and random weights often reaches the top-k boundary.
    """
    values, indices = scores.topk(k, dim=-1, sorted=False)
    kth = values.amin(dim=-1, keepdim=True)
    if not bool(((scores >= kth).sum(-1) > k).any()):  # no tie at the boundary: the set is already unique
        return indices
    above = scores > kth
    tie = scores == kth
    take = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return take.nonzero()[:, -1].view(*scores.shape[:-1], k)


def gather_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows`` [B, n, d], ``idx`` [B, ...] (each in [0, n)) -> [B, ..., d]: one ``index_select`` per sequence, so the
    work is proportional to the rows picked (advanced indexing ``rows[b, idx]`` is several times slower here)."""
    out = rows.new_empty((*idx.shape, rows.shape[-1]))
    for b in range(rows.shape[0]):
        torch.index_select(rows[b], 0, idx[b].reshape(-1), out=out[b].view(-1, rows.shape[-1]))
    return out


class GrowBuffer:
    """An append-only store of rows [B, n, d] with amortised O(1) appends (capacity doubles).

    ``dtype``: the stored dtype (``None``: that of the first rows appended, e.g. the model's). ``view()`` is the
    filled prefix; ``nbytes()`` counts the filled rows (what is stored), ``reserved_nbytes()`` the allocation.
    """

    def __init__(self, dtype: torch.dtype | None = None, min_capacity: int = 64):
        self.data: torch.Tensor | None = None
        self.length = 0
        self.dtype = dtype
        self.min_capacity = min_capacity

    def append(self, rows: torch.Tensor) -> None:
        b, n, d = rows.shape
        if self.data is None:
            cap = max(self.min_capacity, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
            self.dtype = self.dtype or rows.dtype
            self.data = rows.new_empty((b, cap, d), dtype=self.dtype)
        elif self.length + n > self.data.shape[1]:
            cap = self.data.shape[1]
            while cap < self.length + n:
                cap *= 2
            grown = self.data.new_empty((b, cap, d))
            grown[:, : self.length] = self.data[:, : self.length]
            self.data = grown
        self.data[:, self.length : self.length + n] = rows.to(self.dtype)
        self.length += n

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` [B, ...] (each index < length) of each sequence -> [B, ..., d] (:func:`gather_rows`)."""
        return gather_rows(self.view(), idx)

    def view(self, b: int = 0, d: int = 0) -> torch.Tensor:
        if self.data is None:
            return torch.zeros((b, 0, d), dtype=self.dtype)
        return self.data[:, : self.length]

    def nbytes(self) -> int:
        if self.data is None:
            return 0
        return self.data.shape[0] * self.length * self.data.shape[2] * self.data.element_size()

    def reserved_nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()
