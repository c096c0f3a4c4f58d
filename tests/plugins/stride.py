"""``stride``: keep every ``stride``-th token that leaves the exact window (the worked example of
docs/contributing.md; the method contract test loads every file of this folder, so it is tested like the built-ins).

A query at column ``t`` sees the sinks, the exact window (columns ``S + n(t) <= c <= t``) and, of the older
columns, those with ``(c - S) % stride == 0``. What it sees depends only on ``t``, so chunked prefill equals one-shot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvslim.cache.base import BaseLayer, Chunk, LayerSpec, Segment, View, stream_nbytes
from kvslim.cache.method import Method, Params, param, register
from kvslim.cache.storage import Store


@dataclass(frozen=True)
class StrideParams(Params):
    stride: int = param(2, "keep one in `stride` of the tokens leaving the window", lo=1)
    w: int = param(64, "exact recent tokens", lo=1)
    sinks: int = param(4, "exact first tokens", lo=0)


@dataclass(frozen=True)
class StrideSpec(LayerSpec):
    stride: int = 2

    def layer_class(self) -> type[BaseLayer]:
        return StrideLayer


@register
class Stride(Method):
    name = "stride"
    summary = "keep every stride-th token that leaves the window (the contributor guide's example)"
    Params = StrideParams
    lossless = ({"w": 1024},)
    examples = ({"stride": 2, "w": 8, "sinks": 2}, {"stride": 3, "w": 5, "sinks": 0})

    def global_spec(self, index: int) -> StrideSpec:
        p = self.params
        return StrideSpec(window=p.w, sinks=p.sinks, codec=self.codec, label="stride", stride=p.stride)


class StrideLayer(BaseLayer):
    spec: StrideSpec

    def init_state(self) -> None:  # the kept old tokens, stored like the tail
        self.kept_k, self.kept_v = Store(self.tail_k.codec, self.dtype), Store(self.tail_v.codec, self.dtype)
        self.kept_valid = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)

    def stores(self) -> list[Store]:
        return [*super().stores(), self.kept_k, self.kept_v]

    def side_tensors(self) -> list[str]:
        return [*super().side_tensors(), "kept_valid"]

    def stored_length(self) -> int:
        return super().stored_length() + (self.kept_k.n if self.is_initialized else 0)

    def decode_mask_free(self, s: int) -> bool:
        return False  # the tail still holds old columns that are not kept until finish()

    def segments(self, view: View, chunk: Chunk) -> list[Segment]:
        b, _, s, _ = chunk.q.shape
        out = [self.sink_segment(view, chunk)]
        if self.kept_k.n:  # every kept column left the window of every query of this call
            mask = self.kept_valid[:, None, None, :].expand(b, 1, s, self.kept_k.n)
            out.append(Segment(self.kept_k.decode(), self.kept_v.decode(), mask, name="kept"))
        e = int(chunk.cols[-1]) + 1 - self.tail_start
        if view.tail_k is not None and e > 0:
            cols = torch.arange(self.tail_start, self.tail_start + e, device=chunk.q.device)
            keep = (cols - self.spec.sinks) % self.spec.stride == 0
            first = self.spec.sinks + chunk.n_out  # [s]
            vis = ((cols[None] >= first[:, None]) | keep[None]) & (cols[None] <= chunk.cols[:, None])
            vis = vis[None] & self.tail_valid[:, None, :e]
            out.append(Segment(view.tail_k[:, :, :e], view.tail_v[:, :, :e], vis[:, None], name="tail"))
        return [g for g in out if g is not None]

    def finish(self, view: View) -> None:
        drop = max(0, self.spec.sinks + self.n_out(self.seen) - self.tail_start)
        if drop:  # move the kept ones among the columns about to leave into the kept store
            cols = torch.arange(self.tail_start, self.tail_start + drop, device=self.device)
            idx = ((cols - self.spec.sinks) % self.spec.stride == 0).nonzero().squeeze(-1)
            self.kept_k.append(view.tail_k[:, :, idx])
            self.kept_v.append(view.tail_v[:, :, idx])
            self.kept_valid = torch.cat([self.kept_valid, self.tail_valid[:, idx]], 1)
        super().finish(view)

    @classmethod
    def predict(cls, spec: StrideSpec, n: int, shape: Any, batch: int = 1) -> dict[str, int]:
        out = super().predict(spec, n, shape, batch)
        kept = -(-cls.counts(spec, n)["units"] // spec.stride)
        kv = stream_nbytes(shape, spec.tail_codec(), shape.head_dim, kept, batch)
        flops = 4 * batch * shape.heads * shape.head_dim * kept
        return {"stored": out["stored"] + kv + batch * kept, "read": out["read"] + kv, "flops": out["flops"] + flops}
