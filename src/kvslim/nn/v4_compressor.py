"""V4 gated token compressor (paper §2.3.1 eqs. 9-12 for CSA, §2.3.2 eqs. 20-23 for HCA) and its decode state.

Every ``m`` source tokens close a window and emit one entry: ``C_w = RMSNorm(sum_j softmax_j(Z_j + B_j) * C_j)``,
then RoPE at the entry's anchor position ``w * m``. Non-overlapping (HCA): the window is tokens ``[m w, m w + m)``.
Overlapping (CSA): projections are ``2 d`` wide, series ``Ca = [..., :d]`` and ``Cb = [..., d:]``; entry ``w`` pools
``Ca`` of window ``w-1`` with ``Cb`` of window ``w`` (8 tokens at stride 4 for m=4), the softmax running over
``2m`` slots per channel. Entry ``w`` covers tokens up to ``m w + m - 1`` and becomes visible to query ``t`` iff
``w < (t + 1) // m`` (transformers' ``causal_threshold``).

:class:`CompressorState` is constant-size apart from the entries: a buffer of the < m projected tokens of the
open window and, for the overlapping kind, the carry (``Ca`` kv and biased gate of the last closed window).
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.nn._common import GrowBuffer, RMSNorm, Rotary, rope_interleaved

__all__ = ["Compressor", "CompressorState"]


class CompressorState:
    """Running state of one compressor for one batch: open-window buffer, overlap carry, emitted entries.

    ``codec`` (``None`` = float rows) packs each entry on append (see :mod:`kvslim.nn.storage`); readers go through
    :meth:`read_all` (every entry, decoded) or :meth:`gather` (only the given entries, decoded after the gather).
    """

    def __init__(self, codec: object | None = None) -> None:
        self.codec = codec
        self.buf_kv: torch.Tensor | None = None  # [B, m, width] (projections of the open window, module dtype)
        self.buf_gate: torch.Tensor | None = None
        self.fill = 0
        self.carry_kv: torch.Tensor | None = None  # [B, m, d] Ca of the last closed window (overlap only)
        self.carry_gate: torch.Tensor | None = None
        self.entries = GrowBuffer(torch.uint8 if codec is not None else None)  # [B, n, d] model dtype, or bytes
        self.count = 0

    def append(self, rows: torch.Tensor) -> None:
        self.entries.append(rows if self.codec is None else self.codec.encode(rows))

    def read_all(self, b: int, d: int) -> torch.Tensor:
        """Every entry so far [B, N, d] (decoded when packed): O(N) work."""
        if self.entries.data is None:
            return torch.zeros((b, 0, d))
        rows = self.entries.view()
        return rows if self.codec is None else self.codec.decode(rows)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Entries ``idx`` [B, S, k] (clamped to >= 0) -> [B, S, k, d]: O(k) rows read per query."""
        picked = self.entries.gather(idx.clamp(min=0))
        return picked if self.codec is None else self.codec.decode(picked)

    def nbytes(self) -> int:
        """Bytes of the entries plus the fixed-size buffer and carry."""
        extra = sum(t.numel() * t.element_size() for t in (self.buf_kv, self.buf_gate, self.carry_kv,
                                                          self.carry_gate) if t is not None)
        return self.entries.nbytes() + extra

    def reserved_nbytes(self) -> int:
        """Like :meth:`nbytes` but with the entries' allocated capacity (it doubles as entries arrive)."""
        return self.nbytes() - self.entries.nbytes() + self.entries.reserved_nbytes()


class Compressor(nn.Module):
    """Gated pooling of every ``rate`` tokens into one ``dim``-wide entry; ``overlap=True`` is the CSA variant.

    Parameter names follow transformers (``kv_proj``, ``gate_proj``, ``position_bias`` [rate, width], ``kv_norm``).
    """

    def __init__(self, hidden_size: int, dim: int, rate: int, overlap: bool, rotary: Rotary, eps: float = 1e-6):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, eps, cast_after_weight=True)
        self.rotary = rotary

    @torch.no_grad()
    def update(self, hidden: torch.Tensor, state: CompressorState) -> None:
        """Feed ``hidden`` [B, S, D]; emit (append to ``state``) the entry of every window that closes."""
        b, s, _ = hidden.shape
        kv, gate = self.kv_proj(hidden), self.gate_proj(hidden)
        m = self.rate
        if state.buf_kv is None:
            state.buf_kv = kv.new_zeros((b, m, kv.shape[-1]))
            state.buf_gate = gate.new_zeros((b, m, gate.shape[-1]))
        if state.fill + s < m:  # decode fast path: the window stays open
            state.buf_kv[:, state.fill : state.fill + s] = kv
            state.buf_gate[:, state.fill : state.fill + s] = gate
            state.fill += s
            return
        if state.fill:
            kv = torch.cat((state.buf_kv[:, : state.fill], kv), 1)
            gate = torch.cat((state.buf_gate[:, : state.fill], gate), 1)
        usable = (kv.shape[1] // m) * m
        rest = kv.shape[1] - usable
        state.buf_kv[:, :rest] = kv[:, usable:]
        state.buf_gate[:, :rest] = gate[:, usable:]
        state.fill = rest
        nw = usable // m
        ckv = kv[:, :usable].view(b, nw, m, -1)
        cgate = gate[:, :usable].view(b, nw, m, -1) + self.position_bias
        if self.overlap:
            d = self.dim
            pkv = ckv.new_zeros((b, nw, 2 * m, d))
            pgate = cgate.new_full((b, nw, 2 * m, d), float("-inf"))
            pkv[:, :, m:] = ckv[..., d:]
            pgate[:, :, m:] = cgate[..., d:]
            if nw > 1:
                pkv[:, 1:, :m] = ckv[:, :-1, :, :d]
                pgate[:, 1:, :m] = cgate[:, :-1, :, :d]
            if state.carry_kv is not None:
                pkv[:, 0, :m] = state.carry_kv
                pgate[:, 0, :m] = state.carry_gate
            state.carry_kv = ckv[:, -1, :, :d].clone()
            state.carry_gate = cgate[:, -1, :, :d].clone()
            ckv, cgate = pkv, pgate
        pooled = (ckv * cgate.softmax(dim=2, dtype=torch.float32).to(ckv.dtype)).sum(dim=2)
        pooled = self.kv_norm(pooled)
        positions = torch.arange(nw, device=pooled.device) * m + state.count * m
        cos, sin = self.rotary.cos_sin(positions)
        state.append(rope_interleaved(pooled, cos, sin))
        state.count += nw
