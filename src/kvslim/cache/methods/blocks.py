"""``blocks``: CSA-like compression (DeepSeek V4 report sec. 2.3.1): tokens leaving the window pooled m to 1, top-k.

Each block of ``m`` tokens that has left the exact window (plus ``overlap`` earlier tokens) becomes one entry: keys
are pooled *pre-RoPE* (the rotation undone with the known positions; RoPE is orthogonal) and re-rotated at the
block's mean position, values pooled directly; weights ``mean``, ``norm`` (softmax of key norms) or ``attn``
(attention the window tokens received). A query sees block ``j`` iff ``j < n(t)`` (the column rule of
:mod:`kvslim.cache.base` with unit ``m``) and, with ``topk``, only the ``topk`` best of them by ``sum_g q_g . k_entry``
(the DSA/CSA indexer analogue, DeepSeek-V3.2 report sec. 2.1); at decode the selected entries are gathered, so a
step reads ``sinks + topk + window`` entries. ``heavy`` and ``v4`` reuse this layer.
Index letters: b batch, h KV head, g group, s query, n entry, d dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...quant.kernels import kth_largest
from ..base import BaseLayer, Chunk, LayerSpec, Segment, View, stream_nbytes
from ..method import Method, Params, param, register
from ..rope import rotate
from ..rows import Scored, entries, is_rows
from ..storage import Store, append_pair
from .window import sinks_param, window_param, wq_param

__all__ = ["BlockSpec", "Blocks", "BlocksLayer", "BlocksParams", "POOLS", "pool_param"]

POOLS = ("mean", "norm", "attn")
_POOL_BYTES = 64 << 20  # gathered float32 keys per pooling group (larger pools run in several groups)


def pool_param(meaning: str = "pooling weights: mean | norm | attn") -> str:
    return param("mean", meaning, choices=POOLS)


@dataclass(frozen=True)
class BlocksParams(Params):
    m: int = param(4, "tokens pooled into one entry", lo=1)
    k: int = param(32, "blocks attended per query (0 = all)", lo=0)
    w: int = window_param(128)
    sinks: int = sinks_param()
    overlap: int = param(0, "extra earlier tokens pooled into each entry", lo=0)
    pool: str = pool_param("pooling weights: mean | norm (key-norm softmax) | attn (observed attention)")
    wq: int = wq_param()


@dataclass(frozen=True)
class BlockSpec(LayerSpec):
    """A pooled layer: ``block`` tokens per entry, ``topk`` entries per query (0 = all), ``overlap``, ``pool``."""

    block: int = 4
    topk: int = 0
    overlap: int = 0
    pool: str = "mean"

    def layer_class(self) -> type[BaseLayer]:
        return BlocksLayer


@register
class Blocks(Method):
    name = "blocks"
    summary = "CSA-like: tokens leaving the window pooled m:1, top-k blocks per query"
    Params = BlocksParams
    needs_rope = True
    lossless = ({"m": 4, "k": 8, "w": 1024}, {"m": 4, "k": 8, "w": 1024, "pool": "attn"})
    examples = ({"m": 4, "k": 2, "w": 8, "sinks": 2}, {"m": 3, "k": 0, "w": 6, "sinks": 1, "overlap": 2, "pool": "norm"})

    def global_spec(self, index: int) -> BlockSpec:
        p = self.params
        return BlockSpec(window=p.w, sinks=p.sinks, codec=self.codec, window_codec=self.window_codec(),
                         label=self.name, block=p.m, topk=p.k, overlap=p.overlap, pool=p.pool)  # fmt: skip


@dataclass
class BlocksView(View):
    blk_k: torch.Tensor | None = None
    blk_v: Any = None  # [b, h, n, d], or a function idx [b, h, k] -> the chosen entries (decode, top-k)


class BlocksLayer(BaseLayer):
    """Sinks + pooled block entries (through the codec) + the exact tail."""

    needs_positions = True
    codes_tail = True  # the default tail segment and the pooling (which decodes) take Rows
    spec: BlockSpec

    @classmethod
    def unit(cls, spec: BlockSpec) -> tuple[int, int]:
        return spec.block, spec.overlap

    def init_state(self) -> None:
        self.blk_k, self.blk_v = Store(self.ck, self.dtype), Store(self.cv, self.dtype)
        self.blk_valid = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)
        self.n_blocks = 0
        self.wants_probs = self.spec.pool == "attn"
        self.obs = torch.zeros(self.batch, self.heads, 0, device=self.device) if self.wants_probs else None

    def stores(self) -> list[Store]:
        return [*super().stores(), self.blk_k, self.blk_v]

    def side_tensors(self) -> list[str]:
        return [*super().side_tensors(), "blk_valid", "obs"]

    def stored_length(self) -> int:
        return super().stored_length() + (self.n_blocks if self.is_initialized else 0)

    def ingest(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        super().ingest(k, v, pos, valid)
        if self.obs is not None:
            ns = max(0, min(self.spec.sinks - (self.seen - k.shape[2]), k.shape[2]))
            self.obs = torch.cat([self.obs, self.obs.new_zeros(self.batch, self.heads, k.shape[2] - ns)], 2)

    def trim(self, n_next: int) -> int:
        drop = super().trim(n_next)
        if drop and self.obs is not None:
            self.obs = self.obs[:, :, drop:]
        return drop

    def observe(self, segment: Segment, probs: torch.Tensor) -> None:
        a, e = segment.meta
        self.obs[:, :, a:e] += probs.sum(2)

    # ---- pooling ---------------------------------------------------------------------------------------------
    def pool_blocks(self, upto: int, tail_k: torch.Tensor, tail_v: torch.Tensor) -> None:
        """Pool blocks ``n_blocks .. upto-1`` from the decoded tail into entries (keys re-anchored).

        An ``overlap`` beyond the tokens seen reaches only columns before the first token (masked), so it is cut to
        ``seen`` (no change when ``overlap <= sinks + m + w``, the most a first block can use), and blocks are pooled
        in groups of at most ``_POOL_BYTES`` of gathered keys: the work memory stays linear in the tokens held
        whatever ``overlap`` is (one group, as before, below that size)."""
        overlap = min(self.spec.overlap, self.seen)
        span = self.m + overlap
        per_block = self.batch * self.heads * span * self.dim * 4
        step = max(1, _POOL_BYTES // per_block)
        pooled = [self._pool_range(a, min(upto, a + step), overlap, tail_k, tail_v)
                  for a in range(self.n_blocks, upto, step)]  # fmt: skip
        ks, vs, valid = (torch.cat(x, dim) if len(pooled) > 1 else x[0] for x, dim in zip(zip(*pooled), (2, 2, 1)))
        append_pair(self.blk_k, self.blk_v, ks, vs)
        self.blk_valid = torch.cat([self.blk_valid, valid], 1)
        self.n_blocks = upto

    def _pool_range(self, lo: int, hi: int, overlap: int, tail_k: torch.Tensor,
                    tail_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Entries ``[b, h, hi-lo, d]`` (keys re-anchored, values) and validity ``[b, hi-lo]`` of blocks ``lo..hi-1``."""
        sp = self.spec
        j = torch.arange(lo, hi, device=self.device)
        span = self.m + overlap
        cols = sp.sinks + j[:, None] * self.m - overlap + torch.arange(span, device=self.device)
        inside = cols >= max(sp.sinks, self.tail_start)  # [nb, span]
        idx = (cols - self.tail_start).clamp_min(0)
        k = tail_k[:, :, idx]  # [b, h, nb, span, d]
        v = tail_v[:, :, idx]
        pos = self.tail_pos[:, idx].float()  # [b, nb, span]
        valid = self.tail_valid[:, idx] & inside  # [b, nb, span]
        b, h, nb, _, d = k.shape
        k_pre = rotate(k.reshape(b, h, nb * span, d), -pos.reshape(b, nb * span), self.inv_freq).reshape(k.shape)
        vmask = valid[:, None].expand(b, h, nb, span)
        if sp.pool == "norm":
            logits = k_pre.float().norm(dim=-1)
        elif sp.pool == "attn":
            logits = self.obs[:, :, idx].clamp_min(1e-12).log()
        else:
            logits = torch.zeros(b, h, nb, span, device=self.device)
        logits = logits.masked_fill(~vmask, float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [b, h, nb, span]
        k_pool = (w[..., None] * k_pre.float()).sum(3)
        v_pool = (w[..., None] * v.float()).sum(3)
        cnt = valid.sum(-1).clamp_min(1)
        anchor = (pos * valid).sum(-1) / cnt  # [b, nb] mean position of the valid tokens
        return rotate(k_pool, anchor, self.inv_freq).to(self.dtype), v_pool.to(self.dtype), valid.any(-1)

    def prepare(self, q: int, p0: int) -> BlocksView:
        tail_k, tail_v = self.read_tail(q)
        n_next = self.n_out(self.seen)
        if n_next > self.n_blocks:
            dense = [x.decode() if is_rows(x) else x for x in (tail_k, tail_v)]
            self.pool_blocks(n_next, *dense)
        if self.reads_codes(q, self.blk_k, self.blk_v):
            # decode step: block keys scored and the chosen values mixed straight from the codes
            blk_k, blk_v = self.blk_k.rows(), self.blk_v.rows()
        else:
            topk = self.spec.topk
            lazy_values = q == 1 and topk and self.n_out(p0) > topk and self.blk_v.can_gather()
            # at decode with top-k selection, only the selected entries' values are decoded
            blk_k, blk_v = self.blk_k.decode(), self.blk_v.decode_rows if lazy_values else self.blk_v.decode()
        return BlocksView(q, p0, self.sink_k.decode(), self.sink_v.decode(), tail_k, tail_v, blk_k, blk_v)

    def block_segment(self, view: BlocksView, chunk: Chunk) -> Segment | None:
        n_last = int(chunk.n_out[-1])
        if n_last <= 0 or view.blk_k is None:
            return None
        q, topk = chunk.q, self.spec.topk
        b, hq, s, d = q.shape
        h = self.heads
        bk = entries(view.blk_k, 0, n_last)
        bv = view.blk_v if callable(view.blk_v) else entries(view.blk_v, 0, n_last)
        free = self.decode_mask_free(s)  # one query without padding sees every block that has left its window
        vis = hidden = None
        if not free:
            j = torch.arange(n_last, device=q.device)
            vis = (j[None, :] < chunk.n_out[:, None])[None] & self.blk_valid[:, None, :n_last]  # [b, s, n]
            hidden = ~vis[:, None]  # [b, 1, s, n]: what the scores mask, inverted once before the head expansion
            vis = vis[:, None].expand(b, h, s, n_last)
        if topk and n_last > topk:
            if is_rows(bk):  # from the codes: [b, h, g*s, n] per query head
                per_head = bk.score(q.reshape(b, h, hq // h * s, d).float())
                scores = per_head.reshape(b, h, hq // h, s, n_last).sum(2)
            else:
                scores = torch.einsum("bhgsd,bhnd->bhsn", q.reshape(b, h, hq // h, s, d).float(), bk.float())
            if vis is not None:
                scores = scores.masked_fill_(hidden, float("-inf"))  # a fresh tensor: masked in place
            if s == 1:  # decode: gather the selected entries only
                top = scores.topk(topk, dim=-1)
                idx = top.indices[:, :, 0]  # [b, h, k]
                gather = idx[..., None].expand(b, h, topk, d)
                if is_rows(bk):  # the chosen keys' logits are already known: gathered, not scored again
                    bk = Scored(per_head.gather(-1, idx[:, :, None].expand(b, h, hq // h, topk)), d)
                else:
                    bk = bk.gather(2, gather)
                if is_rows(bv):
                    bv = bv.take(idx)
                else:
                    bv = bv(idx) if callable(bv) else bv.gather(2, gather)
                vis = None if free else torch.isfinite(top.values)  # [b, h, 1, k]
            else:  # prefill: the top-k mask, by each row's k-th largest score (a compiled selection when present)
                vis = vis & (scores >= kth_largest(scores, topk))
        return Segment(bk, bv, vis, name="blocks")

    def segments(self, view: BlocksView, chunk: Chunk) -> list[Segment]:
        parts = (self.sink_segment(view, chunk), self.block_segment(view, chunk), self.tail_segment(view, chunk))
        return [s for s in parts if s is not None]

    # ---- prediction ------------------------------------------------------------------------------------------
    @classmethod
    def predict(cls, spec: BlockSpec, n: int, shape: Any, batch: int = 1) -> dict[str, int]:
        out = super().predict(spec, n, shape, batch)
        c = cls.counts(spec, n)
        nb, d = c["units"], shape.head_dim
        entries = stream_nbytes(shape, spec.codec, d, nb, batch)
        side = batch * nb + (4 * batch * shape.kv_heads * c["tail"] if spec.pool == "attn" else 0)
        chosen = min(spec.topk, nb) if spec.topk else nb
        keys_only = batch * shape.kv_heads * _one_stream(shape, spec.codec, d, nb, "key")
        values_read = batch * shape.kv_heads * _one_stream(shape, spec.codec, d, chosen, "value")
        score = 2 * batch * shape.heads * d * nb if spec.topk and nb > spec.topk else 0
        return {
            "stored": out["stored"] + entries + side,
            "read": out["read"] + keys_only + values_read,
            "flops": out["flops"] + 4 * batch * shape.heads * d * chosen + score,
        }


def _one_stream(shape: Any, codec: str, dim: int, count: int, role: str) -> int:
    from ...formats import vectors_nbytes

    return vectors_nbytes(shape.dtype if codec == "none" else codec, dim, count, role)
