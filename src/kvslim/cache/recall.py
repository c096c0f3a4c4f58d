"""``recall``: tiered recall. Block summaries and an exact window hot, every exact token cold, top-k fetched.

With ``S`` sinks, window ``W`` and blocks of ``m`` tokens (the column rule of :mod:`kvslim.cache.layer`), a global
layer keeps

* **hot** (``nbytes()``): the sinks (model dtype), the exact window (the model dtype without a codec, else 16-bit)
  and one summary (``mean`` | ``bbox`` | ``reps``, :mod:`kvslim.cache.summaries`) per block that left the window,
  stored through the recipe's codec;
* **cold** (``cold_nbytes()``, :mod:`kvslim.cache.cold`): the K/V of every token that left the window, in ``ram``
  or on ``disk``, in the ``cold`` codec (``none`` = exact).

A decode query at column ``t`` scores the ``n(t)`` blocks out of its window from their summaries (per KV head, the
group's query heads combined by ``gqa``), fetches the exact tokens of the top ``k`` (+ ``nbr`` neighbours each
side) and attends exactly over sinks + fetched tokens + window. Fetched bytes are counted per step.

Prefill (``prefill=dense``, the default): every query attends exactly to every earlier token, the cold tier read
chunk by chunk and merged by log-sum-exp (:mod:`kvslim.cache.segments`); ``prefill=select``: prefill queries follow
the decode rule (top-``k`` blocks per query). Both depend only on the query's column, so one-shot, chunked and
token-by-token prefill agree. With ``k`` at least the number of blocks and no codecs, the cache is lossless.
Index letters: b batch, h KV head, g group, s queries, n tokens, j blocks, d dim.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .cold import ColdTier, check_cold_codec
from .registry import register_output
from .segments import attend_segment, merge
from .storage import Store, make_storage_codec
from .summaries import score_blocks, select_blocks, summarize, vectors_per_block

__all__ = ["RecallLayer"]

_Q_CHUNK = 512  # queries per prefill attention call
_K_CHUNK = 2048  # tokens per segment read from the cold tier or the window


class RecallLayer(CacheLayerMixin):
    """One global layer under ``recall``. ``opts``: m, k, w, sinks, summary, r, nbr, gqa, cold, prefill, codec
    (of the summaries), window_codec; ``tier`` the cache's :class:`ColdTier`; ``name`` the layer's cold file stem."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self, opts: dict[str, Any], tier: ColdTier, name: str, label: str = "recall") -> None:
        super().__init__()
        self.o, self.tier, self.name, self.label = opts, tier, name, label
        self.S, self.W, self.m = opts["sinks"], opts["w"], opts["m"]
        self.v = vectors_per_block(opts["summary"], opts["r"])
        self.reset()

    def __repr__(self) -> str:
        return f"RecallLayer({self.name})"

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.keys = self.values = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_fetched_bytes = self.last_fetched_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device, self.batch, self.heads, self.dim = key_states.dtype, key_states.device, b, h, d
        exact = make_storage_codec("none", d)
        self.sink_k, self.sink_v = Store(exact, self.dtype), Store(exact, self.dtype)
        wc = make_storage_codec(self.o["window_codec"] or "none", d)
        self.tail_k, self.tail_v = Store(wc, self.dtype), Store(wc, self.dtype)
        self.sc = make_storage_codec(self.o["codec"], d)
        self.summ = Store(self.sc, self.dtype)
        cc = check_cold_codec(self.o["cold"], d)
        self.cold_k = self.tier.stream(f"{self.name}.k", cc, self.dtype, self.device)
        self.cold_v = self.tier.stream(f"{self.name}.v", cc, self.dtype, self.device)
        self.codecs = [c for c in (wc, self.sc, cc) if c is not exact]
        self.sink_valid = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        self.tail_valid = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        self.blk_valid = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        self.cold_valid: torch.Tensor | None = None  # [b, n_cold], held only once padding was seen
        self.n_blocks = 0
        self.has_padding = False
        self.is_initialized = True

    # ---- transformers cache-layer protocol -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError("a recall cache layer was updated twice without attending: use kvslim.make_cache")
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[2]
        register_output(key_states, self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("recall caches cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def _select(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        for s in (self.sink_k, self.sink_v, self.tail_k, self.tail_v, self.summ):
            s.select_batch(fn)
        for s in (self.cold_k, self.cold_v):
            s.select_batch(lambda t: fn(t.to(self.device)))
        for name in ("sink_valid", "tail_valid", "blk_valid", "cold_valid"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None

    # ---- bytes -----------------------------------------------------------------------------------------------
    def nbytes(self, include_codec_state: bool = True) -> int:
        """Hot bytes: sinks, window, summaries, validity masks (and codec constants)."""
        if not self.is_initialized:
            return 0
        total = sum(s.nbytes() for s in (self.sink_k, self.sink_v, self.tail_k, self.tail_v, self.summ))
        for t in (self.sink_valid, self.tail_valid, self.blk_valid, self.cold_valid):
            if t is not None:
                total += t.numel() * t.element_size()
        if include_codec_state:
            total += sum(int(c.state_nbytes()) for c in self.codecs)
        return total

    def cold_nbytes(self) -> int:
        return self.cold_k.nbytes() + self.cold_v.nbytes() if self.is_initialized else 0

    def n_out(self, t: int) -> int:
        return max(0, (t - self.W + 1 - self.S) // self.m)

    # ---- storing ---------------------------------------------------------------------------------------------
    def _ingest(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        p0 = self.seen - k.shape[2]
        if not bool(valid.all()) and not self.has_padding:
            self.has_padding = True
            n_cold = self.n_blocks * self.m
            self.cold_valid = torch.ones(self.batch, n_cold, dtype=torch.bool, device=self.device)
        ns = max(0, min(self.S - p0, k.shape[2]))
        if ns:
            self.sink_k.append(k[:, :, :ns])
            self.sink_v.append(v[:, :, :ns])
            self.sink_valid = torch.cat([self.sink_valid, valid[:, :ns]], 1)
        self.tail_k.append(k[:, :, ns:])
        self.tail_v.append(v[:, :, ns:])
        self.tail_valid = torch.cat([self.tail_valid, valid[:, ns:]], 1)

    def _block_summaries(self, tail_k: torch.Tensor, upto: int) -> torch.Tensor:
        """Summaries ``[b, h, nb, v, d]`` of blocks ``n_blocks .. upto-1`` (at the front of the decoded tail)."""
        nb = upto - self.n_blocks
        keys = tail_k[:, :, : nb * self.m].reshape(self.batch, self.heads, nb, self.m, self.dim)
        valid = self.tail_valid[:, : nb * self.m].reshape(self.batch, nb, self.m)
        return summarize(self.o["summary"], keys, valid, self.o["r"])

    def _move_out(self, upto: int, tail_k: torch.Tensor, tail_v: torch.Tensor, summ: torch.Tensor | None) -> None:
        """Blocks ``n_blocks .. upto-1``: summaries to the hot index, exact K/V to the cold tier, off the window."""
        nb = upto - self.n_blocks
        if nb <= 0:
            return
        n = nb * self.m
        if summ is None:
            summ = self._block_summaries(tail_k, upto)
        self.summ.append(summ.reshape(self.batch, self.heads, nb * self.v, self.dim).to(self.dtype))
        self.cold_k.append(tail_k[:, :, :n])
        self.cold_v.append(tail_v[:, :, :n])
        valid = self.tail_valid[:, :n]
        self.blk_valid = torch.cat([self.blk_valid, valid.reshape(self.batch, nb, self.m).any(-1)], 1)
        if self.cold_valid is not None:
            self.cold_valid = torch.cat([self.cold_valid, valid], 1)
        self.tail_k.drop_front(n)
        self.tail_v.drop_front(n)
        self.tail_valid = self.tail_valid[:, n:]
        self.n_blocks = upto

    def _as_stored(self, summ: torch.Tensor | None) -> torch.Tensor | None:
        """``summ [b, h, nb, v, d]`` as the summary store will give it back (through its codec)."""
        if summ is None:
            return None
        x = summ.reshape(self.batch, self.heads, -1, self.dim).to(self.dtype)
        return self.sc.decode(self.sc.encode(x)).to(self.dtype).reshape(summ.shape)

    def _summaries(self, extra: torch.Tensor | None) -> torch.Tensor:
        s = self.summ.decode()
        s = None if s is None else s.reshape(self.batch, self.heads, -1, self.v, self.dim)
        if extra is None:
            return s
        return extra if s is None else torch.cat([s, extra.to(s.dtype)], 2)

    # ---- attention -------------------------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, positions: torch.Tensor | None, valid_new: torch.Tensor | None,
        scaling: float, softcap: float | None,
    ) -> torch.Tensor:
        """Store the pending tokens and attend. ``query [b, h*g, q, d]`` -> ``[b, q, h*g, d]``."""
        k_new, v_new = self.pending
        self.pending = None
        b, hq, q, d = query.shape
        p0 = self.seen - q
        if valid_new is None:
            valid_new = torch.ones(b, q, dtype=torch.bool, device=query.device)
        self._ingest(k_new, v_new, valid_new)
        n_next = self.n_out(self.seen)
        tail_k, tail_v = self.tail_k.decode(), self.tail_v.decode()
        if q == 1:
            out = self._decode_step(query, scaling, softcap, tail_k, tail_v)
            self._move_out(n_next, tail_k, tail_v, None)
            return out.transpose(1, 2)
        select = self.o["prefill"] == "select" and n_next > 0
        new_summ = self._block_summaries(tail_k, n_next) if select and n_next > self.n_blocks else None
        summ = self._summaries(self._as_stored(new_summ)) if select else None
        sink_k, sink_v = self.sink_k.decode(), self.sink_v.decode()
        plain = softcap is None and not self.has_padding and self.n_blocks == 0 and not select
        if plain:  # nothing cold yet, nothing masked but causality: stock causal sdpa
            kk = tail_k if sink_k is None else torch.cat([sink_k, tail_k], 2)
            vv = tail_v if sink_v is None else torch.cat([sink_v, tail_v], 2)
            if kk.shape[2] == q:
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, kk, vv, is_causal=True, scale=scaling, enable_gqa=True
                )
                self._move_out(n_next, tail_k, tail_v, new_summ)
                return out.transpose(1, 2)
        out = query.new_empty(b, hq, q, d)
        for a in range(0, q, _Q_CHUNK):
            e = min(q, a + _Q_CHUNK)
            t_cols = torch.arange(p0 + a, p0 + e, device=query.device)
            sel = self._prefill_selection(query[:, :, a:e], t_cols, summ) if select else None
            out[:, :, a:e] = self._prefill_chunk(
                query[:, :, a:e], t_cols, sel, (sink_k, sink_v), (tail_k, tail_v), scaling, softcap
            ).to(query.dtype)
        self._move_out(n_next, tail_k, tail_v, new_summ)
        return out.transpose(1, 2)

    def _decode_step(self, query, scaling, softcap, tail_k, tail_v) -> torch.Tensor:
        b, hq, _, d = query.shape
        h, m = self.heads, self.m
        t = self.seen - 1
        ks, vs, ms = [], [], []
        sk, sv = self.sink_k.decode(), self.sink_v.decode()
        if sk is not None:
            ks.append(sk)
            vs.append(sv)
            ms.append(self.sink_valid[:, None, None, :].expand(b, h, 1, sk.shape[2]))
        self.last_fetched_bytes = self.last_fetched_tokens = 0
        nt = self.n_out(t)
        if nt > 0:
            scores = score_blocks(self.o["summary"], query, self._summaries(None)[:, :, :nt], self.o["gqa"])
            vis = self.blk_valid[:, None, None, :nt]
            idx, ok = select_blocks(scores, vis, self.o["k"] or nt, self.o["nbr"])  # [b, h, 1, K]
            rows = (idx[:, :, 0, :, None] * m + torch.arange(m, device=idx.device)).reshape(b, h, -1)
            before = self.cold_k.fetched_bytes + self.cold_v.fetched_bytes
            ks.append(self.cold_k.fetch(rows))
            vs.append(self.cold_v.fetch(rows))
            self.last_fetched_bytes = self.cold_k.fetched_bytes + self.cold_v.fetched_bytes - before
            self.last_fetched_tokens = int(ok.sum()) * m // max(1, b * h)
            tok_ok = ok[:, :, 0, :, None].expand(b, h, idx.shape[-1], m).reshape(b, h, 1, -1)
            if self.cold_valid is not None:
                tok_ok = tok_ok & self.cold_valid.gather(1, rows.reshape(b, -1)).reshape(b, h, 1, -1)
            ms.append(tok_ok)
        if tail_k is not None:
            ks.append(tail_k)
            vs.append(tail_v)
            ms.append(self.tail_valid[:, None, None, :].expand(b, h, 1, tail_k.shape[2]))
        K, V, M = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(ms, 3)
        if softcap is None:
            mask = None if bool(M.all()) else M
            bias = None
            if mask is not None:
                mask = mask | ~mask.any(-1, keepdim=True)  # an all-padding row: output unused
                bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
                bias = bias[:, :, None].expand(b, h, hq // h, 1, K.shape[2]).reshape(b, hq, 1, -1)
            return torch.nn.functional.scaled_dot_product_attention(
                query, K, V, attn_mask=bias, scale=scaling, enable_gqa=True
            )
        return attend_segment(query, K, V, M, scaling, softcap)[0].to(query.dtype)

    def _prefill_selection(self, q: torch.Tensor, t_cols: torch.Tensor, summ: torch.Tensor) -> torch.Tensor:
        """Selected blocks per query ``[b, h, s, nb]`` (bool) under the decode rule."""
        nb = summ.shape[2]
        n_t = torch.div(t_cols - self.W + 1 - self.S, self.m, rounding_mode="floor").clamp_min(0)
        j = torch.arange(nb, device=q.device)
        blk_valid = torch.cat([self.blk_valid, self.tail_valid[:, : (nb - self.n_blocks) * self.m]
                               .reshape(self.batch, -1, self.m).any(-1)], 1)  # fmt: skip
        vis = (j[None, :] < n_t[:, None])[None, None] & blk_valid[:, None, None, :]
        scores = score_blocks(self.o["summary"], q, summ, self.o["gqa"])
        idx, ok = select_blocks(scores, vis, self.o["k"] or nb, self.o["nbr"])
        return torch.zeros_like(vis.expand(scores.shape)).scatter_(-1, idx, ok)

    def _visible(self, cols: torch.Tensor, t_cols: torch.Tensor, valid: torch.Tensor | None,
                 sel: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Mask ``[b|1, h|1, s, n]`` of columns ``cols`` for queries at ``t_cols`` (``sel``: selected blocks)."""
        causal = cols[None, :] <= t_cols[:, None]  # [s, n]
        vis = causal[None, None]
        if sel is not None:
            n_t = torch.div(t_cols - self.W + 1 - self.S, self.m, rounding_mode="floor").clamp_min(0)
            j = torch.div(cols - self.S, self.m, rounding_mode="floor")
            in_blocks = (cols[None, :] >= self.S) & (j[None, :] < n_t[:, None])  # [s, n]
            jj = j.clamp(0, sel.shape[-1] - 1)
            chosen = sel[..., jj]  # [b, h, s, n]
            vis = torch.where(in_blocks[None, None], chosen, causal[None, None])
        if valid is not None:
            vis = vis & valid[:, None, None, :]
        return vis

    def _prefill_chunk(self, q, t_cols, sel, sinks, tail, scaling, softcap) -> torch.Tensor:
        parts = []
        sk, sv = sinks
        if sk is not None:
            cols = torch.arange(sk.shape[2], device=q.device)
            parts.append(attend_segment(q, sk, sv, self._visible(cols, t_cols, self.sink_valid, None), scaling, softcap))
        n_cold = self.n_blocks * self.m
        for a in range(0, n_cold, _K_CHUNK):
            e = min(n_cold, a + _K_CHUNK)
            cols = torch.arange(self.S + a, self.S + e, device=q.device)
            valid = None if self.cold_valid is None else self.cold_valid[:, a:e]
            mask = self._visible(cols, t_cols, valid, sel)
            parts.append(attend_segment(q, self.cold_k.read(a, e), self.cold_v.read(a, e), mask, scaling, softcap))
        tk, tv = tail
        t1 = int(t_cols[-1]) + 1
        start = self.S + n_cold
        for a in range(start, t1, _K_CHUNK):
            e = min(t1, a + _K_CHUNK)
            cols = torch.arange(a, e, device=q.device)
            mask = self._visible(cols, t_cols, self.tail_valid[:, a - start : e - start], sel)
            parts.append(attend_segment(q, tk[:, :, a - start : e - start], tv[:, :, a - start : e - start], mask,
                                        scaling, softcap))  # fmt: skip
        return merge(parts)
