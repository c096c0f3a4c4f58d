"""Stored vectors that attention reads without decoding them: :class:`Rows`, and attention over segments of them.

A :class:`Rows` is ``[b, h, n, d]`` vectors held as parts in token order: dense tensors, or packed codes whose codec
has the ``attends_from_codes`` capability (TurboQuant, FP8, KIVI: see :mod:`kvslim.quant`). Scores and mixes go
through ``codec.score_f32`` / ``codec.mix_f32``, which work from the codes (a compiled kernel where a C compiler
is present), so a decode step reads the packed bytes once instead of decoding every stored vector to floats first.
A KIVI stream is two parts: its quantised prefix and its fp16 residual.

:func:`rows_attention` is the explicit-softmax attention of :func:`~kvslim.cache.attend.grouped_attention` over
segments whose keys or values may be :class:`Rows`: logits per segment, one softmax over all of them, then the
probabilities mix each segment's values. :func:`decode_attention` is the same attention for a decode step that sees
everything it is given (no mask, no probabilities wanted), with fewer calls: the dense segments joined (one matmul
for their logits, one for their mix), no mask work. A :class:`Scored` segment carries keys whose logits
are already known (the top-k blocks a selector scored from the codes), so they are not scored twice.
Index letters: b batch, h KV head, G folded queries, n entry, d dim.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

__all__ = ["Rows", "Scored", "decode_attention", "entries", "is_rows", "rows_attention"]


class Rows:
    """``[b, h, n, d]`` vectors as parts (token order): a dense tensor ``[b, h, n_i, d]`` or ``(codec, Packed)``."""

    def __init__(self, parts: list[Any], dtype: torch.dtype) -> None:
        self.parts = [p for p in parts if _length(p)]
        self.dtype = dtype

    @property
    def n(self) -> int:
        return sum(_length(p) for p in self.parts)

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        lead = first.shape[:2] if isinstance(first, torch.Tensor) else first[1].shape[:2]
        dim = first.shape[-1] if isinstance(first, torch.Tensor) else first[1].shape[-1]
        return (*lead, self.n, dim)

    def score(self, q: torch.Tensor) -> torch.Tensor:
        """``q [b, h, G, d]`` float32 -> ``q . x [b, h, G, n]`` float32."""
        out = []
        for p in self.parts:
            if isinstance(p, torch.Tensor):
                out.append(q @ p.to(torch.float32).transpose(-1, -2))
            else:
                out.append(p[0].score_f32(q, p[1]))
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

    def mix(self, w: torch.Tensor) -> torch.Tensor:
        """``w [b, h, G, n]`` float32 -> ``sum_n w x [b, h, G, d]`` float32."""
        out, off = None, 0
        for p in self.parts:
            k = _length(p)
            wp = w[..., off : off + k]
            part = wp @ p.to(torch.float32) if isinstance(p, torch.Tensor) else p[0].mix_f32(wp, p[1])
            out = part if out is None else out + part
            off += k
        return out

    def slice(self, a: int, e: int) -> Rows:
        """Entries ``[a, e)``."""
        if a <= 0 and e >= self.n:
            return self
        parts, off = [], 0
        for p in self.parts:
            k = _length(p)
            lo, hi = max(a - off, 0), min(e - off, k)
            if hi > lo:
                if isinstance(p, torch.Tensor):
                    parts.append(p[:, :, lo:hi])
                else:
                    parts.append((p[0], p[1].slice_tokens(lo, hi)))
            off += k
        return Rows(parts, self.dtype)

    def take(self, idx: torch.Tensor) -> Rows:
        """Entries ``idx [b, h, k]`` per batch row and head (the packed fields are gathered, nothing is decoded)."""
        if len(self.parts) != 1 or (not isinstance(self.parts[0], torch.Tensor) and self.parts[0][1].grouped):
            x = self.decode()
            return Rows([x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))], self.dtype)
        p = self.parts[0]
        if isinstance(p, torch.Tensor):
            return Rows([p.gather(2, idx[..., None].expand(*idx.shape, p.shape[-1]))], self.dtype)
        codec, packed = p
        b, h, k = idx.shape
        fields = {n: f.gather(2, idx[..., None].expand(b, h, k, f.shape[-1])) for n, f in packed.fields.items()}
        return Rows([(codec, replace(packed, fields=fields, shape=(b, h, k, packed.shape[-1])))], self.dtype)

    def decode(self) -> torch.Tensor:
        """The vectors as ``[b, h, n, d]`` in ``dtype``."""
        out = [p if isinstance(p, torch.Tensor) else p[0].decode(p[1]) for p in self.parts]
        return torch.cat([x.to(self.dtype) for x in out], dim=2)


class Scored:
    """Keys ``[b, h, n, d]`` whose logits for the current chunk's queries are known: ``logits [b, h, G, n]``
    float32 (``q . k``, before scaling and softcap), e.g. gathered from the scores a top-k selector computed."""

    def __init__(self, logits: torch.Tensor, dim: int) -> None:
        self.logits = logits
        self.n = logits.shape[-1]
        self.shape = (logits.shape[0], logits.shape[1], self.n, dim)


def _length(p: Any) -> int:
    return p.shape[2] if isinstance(p, torch.Tensor) else p[1].tokens


def is_rows(x: Any) -> bool:
    """True for keys or values that are not one dense tensor (:class:`Rows` read from codes, :class:`Scored`)."""
    return isinstance(x, (Rows, Scored))


def entries(x: torch.Tensor | Rows, a: int, e: int) -> torch.Tensor | Rows:
    """Entries ``[a, e)`` of a ``[b, h, n, d]`` tensor or of :class:`Rows`."""
    return x.slice(a, e) if isinstance(x, Rows) else x[:, :, a:e]


def _score(x: torch.Tensor | Rows | Scored, q: torch.Tensor) -> torch.Tensor:
    if isinstance(x, Scored):
        return x.logits
    return x.score(q) if isinstance(x, Rows) else q @ x.to(torch.float32).transpose(-1, -2)


def _mix(x: torch.Tensor | Rows, w: torch.Tensor) -> torch.Tensor:
    return x.mix(w) if isinstance(x, Rows) else w @ x.to(torch.float32)


def _n(x: torch.Tensor | Rows) -> int:
    return x.n if isinstance(x, Rows) else x.shape[2]


def rows_attention(
    q: torch.Tensor, keys: list[Any], values: list[Any], mask: torch.Tensor | None, scaling: float,
    softcap: float | None = None, may_be_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``q [b, hq, s, d]``; per segment keys / values ``[b, h, n_i, d]`` (tensors or :class:`Rows`); ``mask
    [b, h|1, s, sum n_i]`` bool or None -> (``[b, s, hq, d]`` in ``q``'s dtype, probabilities ``[b, h, g*s, sum n_i]``,
    the segment lengths)."""
    b, hq, s, d = q.shape
    h = keys[0].shape[1]
    g = hq // h
    qg = q.reshape(b, h, g * s, d).to(torch.float32)
    lengths = [_n(k) for k in keys]
    logits = torch.cat([_score(k, qg) for k in keys], dim=-1) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        mask = mask[:, :, None].expand(b, mask.shape[1], g, s, mask.shape[-1]).reshape(b, mask.shape[1], g * s, -1)
        if may_be_empty:  # rows with nothing visible (padding queries): attend to everything, output unused
            mask = mask | ~mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out, off = None, 0
    for v, n in zip(values, lengths, strict=True):
        part = _mix(v, probs[..., off : off + n])
        out = part if out is None else out + part
        off += n
    return out.to(q.dtype).reshape(b, hq, s, -1).transpose(1, 2), probs, lengths


def decode_attention(
    q: torch.Tensor, keys: list[Any], values: list[Any], scaling: float, softcap: float | None = None,
) -> torch.Tensor:
    """:func:`rows_attention` for queries that see every entry of every segment (a decode step without padding) and
    want no probabilities: ``q [b, hq, s, d]`` -> ``[b, s, hq, d]`` in ``q``'s dtype. The dense segments (tensor
    keys and values) are joined so they cost one matmul for their logits and one for their mix; the others are
    scored and mixed from their codes (or their known logits); one softmax over everything."""
    b, hq, s, d = q.shape
    h = keys[0].shape[1]
    qg = q.reshape(b, h, hq // h * s, d).to(torch.float32)
    dense = [i for i, (k, v) in enumerate(zip(keys, values, strict=True)) if not (is_rows(k) or is_rows(v))]
    codes = [i for i in range(len(keys)) if i not in dense]
    logits, nd = [], 0
    if dense:
        kd = keys[dense[0]] if len(dense) == 1 else torch.cat([keys[i] for i in dense], dim=2)
        vd = values[dense[0]] if len(dense) == 1 else torch.cat([values[i] for i in dense], dim=2)
        nd = kd.shape[2]
        logits.append(qg @ kd.to(torch.float32).transpose(-1, -2))
    logits += [_score(keys[i], qg) for i in codes]
    logits = (logits[0] if len(logits) == 1 else torch.cat(logits, dim=-1)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    probs = torch.softmax(logits, dim=-1)
    out = probs[..., :nd] @ vd.to(torch.float32) if dense else None
    off = nd
    for i in codes:
        n = _n(keys[i])
        part = _mix(values[i], probs[..., off : off + n])
        out = part if out is None else out + part
        off += n
    return out.to(q.dtype).reshape(b, hq, s, -1).transpose(1, 2)
