"""One compressed cache layer: sinks + exact tail + pooled block entries (or low-rank latents), through a codec.

Columns are token indices in the (possibly left-padded) input, 0 = first token ever given. With ``S`` sinks, a
window ``W`` and block size ``m``, the query at column ``t`` sees

* sink columns ``c < S`` with ``c <= t``;
* block entry ``j`` (columns ``[S + j*m - overlap, S + (j+1)*m)``, pooled) iff ``j < n(t)``, where
  ``n(t) = max(0, (t - W + 1 - S) // m)`` counts the blocks that left the window of ``t`` completely
  (and, with ``topk``, only the ``topk`` best-scoring of them for this query);
* exact columns ``S + n(t)*m <= c <= t``.

A window layer is the same with ``m = 1`` and the blocks dropped instead of pooled; an unbounded layer has
``n(t) = 0``. Because what a query sees depends only on its column, one-shot prefill, chunked prefill and
token-by-token decode attend to the same entries (``pool=attn`` excepted: its weights depend on the queries seen).

``update`` (called by the stock attention module) only records the new post-RoPE K/V and returns them; the
kvslim attention function then calls :meth:`KvslimLayer.attend`, which knows the queries, positions and padding,
stores, pools and attends. Index letters: b batch, h KV head, g query heads per KV head, q queries, n entries, d dim.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from ..recipe import LayerSpec
from .attend import attend_chunk
from .registry import register_output
from .rope import rotate
from .storage import Store

__all__ = ["KvslimLayer"]

_QUERY_CHUNK = 1024


def _cat(parts: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    kept = [p for p in parts if p is not None and p.shape[dim] > 0]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim=dim)


class KvslimLayer(CacheLayerMixin):
    """A transformers cache layer implementing one :class:`LayerSpec`.

    ``codec_factory(dim)`` builds the storage codec; ``inv_freq`` (``[R/2]``) is needed to pool keys (un-rotate and
    re-anchor) and for latent layers; ``basis`` is ``(Uk [h, d, r], Uv [h, d, r])`` for latent layers.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, spec: LayerSpec, codec_factory: Any, inv_freq: torch.Tensor | None, basis: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.codec_factory = codec_factory
        self.inv_freq = inv_freq
        self.basis = basis
        self.is_sliding = spec.sliding is not None
        self.m = spec.block if spec.mode == "blocks" else 1
        self.reset()

    def __repr__(self) -> str:
        return f"KvslimLayer({self.spec.label})"

    # ---- transformers cache-layer protocol -------------------------------------------------------------------
    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.keys = self.values = None  # never held: stored data lives in the stores below
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dt, dev = key_states.dtype, key_states.device
        self.dtype, self.device, self.batch, self.heads, self.dim = dt, dev, b, h, d
        vec = self.spec.rank if self.spec.mode == "latent" else d
        # one codec per stream (keys, values): KIVI differs by role, fractional TurboQuant calibrates per stream
        ck, cv = self.codec_factory(vec, "key"), self.codec_factory(vec, "value")
        self.codecs = [ck] if cv is ck else [ck, cv]
        # sinks (a handful of attention-sink tokens, the outliers softmax leans on) stay exact in the model dtype
        from .storage import make_storage_codec

        exact = make_storage_codec("none", vec)
        self.sink_k, self.sink_v = Store(exact, dt), Store(exact, dt)
        self.blk_k, self.blk_v = Store(ck, dt), Store(cv, dt)
        wcodec = self.spec.window_codec
        if self.spec.window is not None and type(ck).__name__ == "KiviCodec":
            # KIVI is append-only (groups of 32 tokens share key scales): a sliding window stays 16-bit, as
            # KIVI's own recent-token residual does
            wcodec = "fp16"
        if self.spec.window is not None and wcodec and wcodec != self.spec.codec:
            ck = cv = make_storage_codec(wcodec, vec)
            self.codecs.append(ck)
        self.tail_k, self.tail_v = Store(ck, dt), Store(cv, dt)
        self.sink_valid = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        self.tail_valid = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        self.blk_valid = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        self.needs_pos = self.spec.mode in ("blocks", "latent")
        self.tail_pos = torch.zeros(b, 0, dtype=torch.int32, device=dev) if self.needs_pos else None
        self.obs = torch.zeros(b, h, 0, dtype=torch.float32, device=dev) if self.spec.pool == "attn" else None
        self.tail_start = self.spec.sinks
        self.n_blocks = 0
        self.has_padding = False
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Record the new post-RoPE ``[b, h, q, d]`` states; :meth:`attend` stores them. Returns them unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "a kvslim cache layer was updated twice without attending: the model is not using the 'kvslim' "
                "attention (build the cache with kvslim.make_cache(model, recipe), which selects it)"
            )
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[2]
        register_output(key_states, self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def stored_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_k.n + self.n_blocks + self.tail_k.n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvslim compressed caches cannot be cropped (compression is not reversible)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def _select(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        for s in (self.sink_k, self.sink_v, self.tail_k, self.tail_v, self.blk_k, self.blk_v):
            s.select_batch(fn)
        for name in ("sink_valid", "tail_valid", "blk_valid", "tail_pos", "obs"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def offload(self) -> None:  # everything stays where it is
        return None

    def prefetch(self) -> None:
        return None

    # ---- bytes -----------------------------------------------------------------------------------------------
    def nbytes(self, include_codec_state: bool = True) -> int:
        """Bytes held: packed K/V of sinks, blocks and tail, validity/position/score side tensors, the latent basis,
        and (unless the cache counts shared codecs itself) the constants of this layer's codecs."""
        if not self.is_initialized:
            return 0
        total = sum(s.nbytes() for s in (self.sink_k, self.sink_v, self.tail_k, self.tail_v, self.blk_k, self.blk_v))
        for t in (self.sink_valid, self.tail_valid, self.blk_valid, self.tail_pos, self.obs):
            if t is not None:
                total += t.numel() * t.element_size()
        if include_codec_state:
            total += sum(int(c.state_nbytes()) for c in self.codecs)
        if self.basis is not None:
            total += sum(u.numel() * u.element_size() for u in self.basis)
        return total

    # ---- the column rule -------------------------------------------------------------------------------------
    def n_out(self, t: int) -> int:
        """Blocks (or dropped tokens, m = 1) that have completely left the window of the query at column ``t``."""
        w = self.spec.window
        if w is None:
            return 0
        return max(0, (t - w + 1 - self.spec.sinks) // self.m)

    # ---- storing ---------------------------------------------------------------------------------------------
    def _encode_tail(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.mode != "latent":
            return k, v
        uk, uv = self.basis
        k_pre = rotate(k, -pos, self.inv_freq)
        return torch.einsum("bhnd,hdr->bhnr", k_pre, uk.to(k.dtype)), torch.einsum("bhnd,hdr->bhnr", v, uv.to(v.dtype))

    def _decode_tail(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, v = self.tail_k.decode(), self.tail_v.decode()
        if k is None or self.spec.mode != "latent":
            return k, v
        uk, uv = self.basis
        k = torch.einsum("bhnr,hdr->bhnd", k, uk.to(k.dtype))
        k = rotate(k, self.tail_pos, self.inv_freq)
        return k, torch.einsum("bhnr,hdr->bhnd", v, uv.to(v.dtype))

    def _ingest(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        p0 = self.seen - k.shape[2]
        self.has_padding = self.has_padding or not bool(valid.all())
        ns = max(0, min(self.spec.sinks - p0, k.shape[2]))
        if ns:
            ks, vs = self._encode_tail(k[:, :, :ns], v[:, :, :ns], pos[:, :ns])
            self.sink_k.append(ks)
            self.sink_v.append(vs)
            self.sink_valid = torch.cat([self.sink_valid, valid[:, :ns]], 1)
        kt, vt = self._encode_tail(k[:, :, ns:], v[:, :, ns:], pos[:, ns:])
        self.tail_k.append(kt)
        self.tail_v.append(vt)
        self.tail_valid = torch.cat([self.tail_valid, valid[:, ns:]], 1)
        if self.tail_pos is not None:
            self.tail_pos = torch.cat([self.tail_pos, pos[:, ns:].to(torch.int32)], 1)
        if self.obs is not None:
            self.obs = torch.cat([self.obs, self.obs.new_zeros(self.batch, self.heads, k.shape[2] - ns)], 2)

    def _pool_blocks(self, upto: int, tail_k: torch.Tensor, tail_v: torch.Tensor) -> None:
        """Pool blocks ``n_blocks .. upto-1`` from the decoded tail into entries (keys re-anchored)."""
        j = torch.arange(self.n_blocks, upto, device=self.device)
        span = self.m + self.spec.overlap
        cols = self.spec.sinks + j[:, None] * self.m - self.spec.overlap + torch.arange(span, device=self.device)
        inside = cols >= max(self.spec.sinks, self.tail_start)  # [nb, span]
        idx = (cols - self.tail_start).clamp_min(0)
        k = tail_k[:, :, idx]  # [b, h, nb, span, d]
        v = tail_v[:, :, idx]
        pos = self.tail_pos[:, idx].float()  # [b, nb, span]
        valid = self.tail_valid[:, idx] & inside  # [b, nb, span]
        b, h, nb, _, d = k.shape
        k_pre = rotate(k.reshape(b, h, nb * span, d), -pos.reshape(b, nb * span), self.inv_freq).reshape(k.shape)
        vmask = valid[:, None].expand(b, h, nb, span)
        if self.spec.pool == "norm":
            logits = k_pre.float().norm(dim=-1)
        elif self.spec.pool == "attn":
            logits = self.obs[:, :, idx].clamp_min(1e-12).log()
        else:
            logits = torch.zeros(b, h, nb, span, device=self.device)
        logits = logits.masked_fill(~vmask, float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [b, h, nb, span]
        k_pool = (w[..., None] * k_pre.float()).sum(3)
        v_pool = (w[..., None] * v.float()).sum(3)
        cnt = valid.sum(-1).clamp_min(1)
        anchor = (pos * valid).sum(-1) / cnt  # [b, nb] mean position of the valid tokens
        k_entry = rotate(k_pool, anchor, self.inv_freq).to(self.dtype)
        self.blk_k.append(k_entry)
        self.blk_v.append(v_pool.to(self.dtype))
        self.blk_valid = torch.cat([self.blk_valid, valid.any(-1)], 1)
        self.n_blocks = upto

    def _trim(self, n_next: int) -> None:
        start = self.spec.sinks + n_next * self.m - (self.spec.overlap if self.spec.mode == "blocks" else 0)
        drop = max(0, start - self.tail_start)
        if drop:
            self.tail_k.drop_front(drop)
            self.tail_v.drop_front(drop)
            self.tail_valid = self.tail_valid[:, drop:]
            if self.tail_pos is not None:
                self.tail_pos = self.tail_pos[:, drop:]
            if self.obs is not None:
                self.obs = self.obs[:, :, drop:]
            self.tail_start += drop

    # ---- attention -------------------------------------------------------------------------------------------
    def _plain_causal(self, q: int, p0: int) -> bool:
        return (
            p0 == 0 and q > 1 and self.spec.window is None and self.spec.sinks == 0 and not self.has_padding
            and self.obs is None and self.tail_k.n == q
        )

    def _query_chunk(self) -> int:
        """Queries per attention call: a chunk sees about ``chunk + W + m`` exact tokens, so windowed layers use
        chunks near their window (less work per query), unbounded layers 1024."""
        if self.spec.window is None:
            return _QUERY_CHUNK
        return max(256, min(_QUERY_CHUNK, self.spec.window + self.m + self.spec.overlap))

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor | None, valid_new: torch.Tensor | None,
        scaling: float, softcap: float | None,
    ) -> torch.Tensor:
        """Store the pending tokens, pool what left the window, and attend.

        query ``[b, h*g, q, d]``; positions ``[b|1, q]`` (RoPE positions of the new tokens); valid_new ``[b, q]``
        bool (False for padding). Returns ``[b, q, h*g, d]``.
        """
        k_new, v_new = self.pending
        self.pending = None
        b, hq, q, d = query.shape
        p0 = self.seen - q
        if positions is None:
            positions = torch.arange(p0, p0 + q, device=query.device)[None]
        positions = positions.expand(b, q)
        if valid_new is None:
            valid_new = torch.ones(b, q, dtype=torch.bool, device=query.device)
        self._ingest(k_new, v_new, positions, valid_new)
        n_next = self.n_out(self.seen)
        tail_k, tail_v = self._decode_tail()
        if self.spec.mode == "blocks" and n_next > self.n_blocks:
            self._pool_blocks(n_next, tail_k, tail_v)
        sink_k, sink_v = self.sink_k.decode(), self.sink_v.decode()
        blk_k = self.blk_k.decode()
        lazy_values = q == 1 and self.spec.topk and self.n_out(p0) > self.spec.topk and self.blk_v.can_gather()
        # at decode with top-k selection, only the selected entries' values are decoded
        blk_v = self.blk_v.decode_rows if lazy_values else self.blk_v.decode()
        if softcap is None and self._plain_causal(q, p0):  # fresh unpadded prefill of an unbounded layer: stock causal sdpa
            out = torch.nn.functional.scaled_dot_product_attention(
                query, tail_k, tail_v, is_causal=True, scale=scaling, enable_gqa=True
            )
            self._trim(n_next)
            return out.transpose(1, 2)
        out = query.new_empty(b, q, hq, d)
        chunk = self._query_chunk()
        for a in range(0, q, chunk):
            e = min(q, a + chunk)
            t_cols = torch.arange(p0 + a, p0 + e, device=query.device)
            out[:, a:e] = attend_chunk(
                self, query[:, :, a:e], t_cols, (sink_k, sink_v), (blk_k, blk_v), (tail_k, tail_v), scaling, softcap
            )
        self._trim(n_next)
        return out
