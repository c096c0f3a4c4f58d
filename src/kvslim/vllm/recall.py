"""Tiered recall inside vLLM: block summaries in vLLM's pages, every row in a cold array addressed by vLLM's slots.

Selected with a ``recall`` format (:mod:`kvslim.vllm.recall_spec`: ``recall-fp8`` or ``recall:k=...[+CODEC]``).

* **Hot** (vLLM's pool, the memory vLLM sizes and schedules by): per block of ``m`` tokens (vLLM's block size) and
  KV head only the block's summary (``bbox``: per-channel min and max of its keys; ``mean``; ``reps``) through the
  recipe's codec, spread over the block's ``m`` page cells (``customize_spec``: ``uint8``,
  ``ceil(vectors x summary row / m)`` bytes per cell). vLLM's "KV cache size" and maximum concurrency count those
  bytes.
* **Cold** (owned by this backend): per layer one array ``uint8 [num_blocks, kv_heads, m, 2 x row]`` of packed
  ``[key row | value row]`` cells (the ``cold`` codec, or the model dtype's lossless twin), addressed by vLLM's own
  slot ids (block id x block size + offset), so a slot's cold rows are valid exactly while vLLM keeps its page:
  freeing, prefix-cache reuse and preemption need nothing here (a reused block is overwritten by its next write).
  Its size is ``cold_bytes``; the plugin caps vLLM's block count (``num_gpu_blocks_override``) so the pool never
  promises more tokens than the cold array holds (:func:`kvslim.vllm._select_from_config`). On the CPU the cold
  array is host memory (``torch.empty``: pages are touched only when written); on another device it sits on that
  device (a pinned host array with transfers is not written: no GPU here).
* **Writes** (``do_kv_cache_update``): the step's K/V are encoded into the cold array at ``slot_mapping``; every
  block completed by the step (its last slot written) gets its summary computed from its cold keys (decoded) and
  written to its page.
* **Reads** (``forward``): a request with several query rows this step (a prefill chunk, a prefix-cache hit) attends
  exactly over all its rows, read from the cold array through its block table
  (:func:`~kvslim.vllm.layout.paged_attention`); a one-query request (a decode step) scores the summaries of its
  blocks that lie wholly before its recent window, per KV head (the group's query heads combined by ``gqa``), takes
  the top ``k`` (``nbr`` neighbours each side), gathers those blocks' rows plus the ``sinks`` first and the ``w``
  most recent tokens from the cold array and attends exactly. With ``k=0`` (or ``k`` at least the number of
  blocks) every row is attended: the plain paged attention of the lossless layout.
* **Pins** (``pin=P``, ``span``, ``pinw``; kvslim's ``recall`` rule): at every step where a request has two or more
  query rows (a prefill chunk), the chunk's last row scores the request's blocks wholly before its window exactly
  (per KV head the log-sum-exp of its logits over each block's rows, read from the cold array, the sinks left out,
  the group's query heads combined by max) and its ``P`` best blocks per KV head are written as a **stamp** into the
  page of the block that holds that row, after the summary (``int32 [1 + P]`` per KV head: the row's offset in the
  block + 1, then the ``P`` block indices of the request, -1 for none). A decode step reads the stamps of all its
  blocks and takes, per KV head, the one at the largest position (its latest multi-row step: a later prompt's pins
  supersede an earlier one's, as in kvslim's transformers cache); the pinned blocks (each with the ``span - 1`` after
  it) are fetched first, as ``P x span`` of its ``k``. A stamp lives in vLLM's page, so it lives exactly as long as
  the block: the stamps of a block are cleared when its first slot is written (a fresh or reused block), so a stale
  stamp is never read; a block shared through the prefix cache holds the same tokens after the same prefix, so a
  stamp in it is what that row computed for every request sharing it, and each request's own later rows (its own
  blocks) carry its own pins. vLLM's attention metadata carries no request identity (``req_idx`` is the runner's
  batch slot, reused across requests), which is why the pins live in the pages.

Counting (:func:`stats`): the pool's bytes (vLLM's pages), the cold arrays' bytes, and per decode step the cold rows
and bytes of the fetched blocks, and of the sinks + window (read from the cold array on this CPU path, which the
issue counts as hot).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.v1.kv_cache_interface import AttentionSpec

from kvslim.cache.methods.recall.summaries import score_blocks, select_blocks, summarize
from kvslim.errors import InvalidInput

from . import selected_format
from .backend import KvslimAttentionBackend, KvslimAttentionImpl, KvslimMetadata
from .layout import RowLayout, _from_codes, paged_attention, write_slots
from .recall_spec import RecallFormat, parse_recall

__all__ = ["KvslimRecallBackend", "KvslimRecallImpl", "counters", "reset_stats", "stats"]

_log = logging.getLogger("vllm.kvslim")  # under vLLM's logger: its handler prints it
_FORMATS: dict[str, RecallFormat] = {}
_LAYOUTS: dict[tuple[str, int], RowLayout] = {}
_STATS: dict[str, Any] = {}


def reset_stats() -> None:
    _STATS.clear()
    _STATS.update(layers={}, decode_calls=0, prefill_calls=0, context_rows=0, fetched_rows=0, window_rows=0,
                  fetched_bytes=0, window_bytes=0, step_fetched_bytes_max=0, pin_stamps=0, pinned_decodes=0)


reset_stats()


def stats() -> dict[str, Any]:
    """What the tiers held and what decode read, in this process (every layer of this worker).

    ``pool_bytes``: vLLM's pages (summaries) of every layer; ``cold_bytes``: the cold arrays; ``decode_tokens``:
    request decode steps (one query each); per decode token over all layers ``fetched_bytes_per_token`` (the rows
    of the selected blocks) and ``window_bytes_per_token`` (sinks + window rows, read from the cold array on this
    path); ``fetched_share`` / ``read_share``: those rows over the context's rows; ``pin_stamps`` (stamps written)
    and ``pinned_decodes`` (decode steps that fetched pinned blocks), per layer."""
    layers = _STATS["layers"]
    n = max(1, len(layers))
    tokens = _STATS["decode_calls"] / n
    ctx = max(1, _STATS["context_rows"])
    return {
        "layers": len(layers),
        "pool_bytes": sum(v["pool_bytes"] for v in layers.values()),
        "cold_bytes": sum(v["cold_bytes"] for v in layers.values()),
        "cold_tokens": min((v["cold_tokens"] for v in layers.values()), default=0),
        "decode_tokens": tokens,
        "prefill_calls": _STATS["prefill_calls"] / n,
        "fetched_bytes": _STATS["fetched_bytes"],
        "fetched_bytes_per_token": _STATS["fetched_bytes"] / tokens if tokens else 0.0,
        "window_bytes_per_token": _STATS["window_bytes"] / tokens if tokens else 0.0,
        "fetched_share": _STATS["fetched_rows"] / ctx,
        "read_share": (_STATS["fetched_rows"] + _STATS["window_rows"]) / ctx,
        "pin_stamps": _STATS["pin_stamps"] / n,
        "pinned_decodes": _STATS["pinned_decodes"] / n,
    }


def counters() -> dict[str, float]:
    """The raw counters behind :func:`stats` (decode calls are per layer), to take differences around a batch;
    ``layers`` and ``cold_bytes_per_token`` (the cold arrays' bytes per token slot, all layers) beside them."""
    layers = _STATS["layers"]
    slots = min((v["cold_tokens"] for v in layers.values()), default=0)
    out = {k: float(_STATS[k]) for k in ("decode_calls", "context_rows", "fetched_rows", "window_rows",
                                          "fetched_bytes", "window_bytes")}
    out["layers"] = float(len(layers))
    out["cold_bytes_per_token"] = sum(v["cold_bytes"] for v in layers.values()) / slots if slots else 0.0
    return out


def recall_format() -> RecallFormat:
    fmt = selected_format()
    if fmt is None:
        raise InvalidInput("kvslim's vLLM recall backend is active but no kvslim format is selected")
    if fmt not in _FORMATS:
        _FORMATS[fmt] = parse_recall(fmt)
    return _FORMATS[fmt]


def _layout(fmt: str, head_size: int) -> RowLayout:
    if (fmt, head_size) not in _LAYOUTS:
        _LAYOUTS[(fmt, head_size)] = RowLayout(fmt, head_size)
    return _LAYOUTS[(fmt, head_size)]


class KvslimRecallBackend(KvslimAttentionBackend):
    """Decoder attention with block summaries in vLLM's pages and the rows in a cold array."""

    @staticmethod
    def get_impl_cls() -> type[KvslimRecallImpl]:
        return KvslimRecallImpl

    @classmethod
    def _check_head_size(cls, head_size: int) -> None:
        rf = recall_format()
        _layout(rf.summary_format("float32"), head_size)
        _layout(rf.cold_format("float32"), head_size)

    @classmethod
    def _cell_bytes(cls, spec: AttentionSpec) -> int:
        """Pages of summaries: one block's summary per KV head spread over its ``m`` cells."""
        rf = recall_format()
        if spec.block_size != rf.m:
            raise InvalidInput(f"kvslim format {rf.text!r}: vLLM's block size is {spec.block_size}, the recipe's "
                               f"block m={rf.m}; leave --block-size out (the plugin sets it) or give m={spec.block_size}")  # fmt: skip
        return rf.cell_bytes(_layout(rf.summary_format(spec.dtype), spec.head_size).row_bytes)


class KvslimRecallImpl(KvslimAttentionImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rf = recall_format()
        self.key = str(id(self))
        self.cold: torch.Tensor | None = None
        self.clay: RowLayout | None = None
        self.slay: RowLayout | None = None

    def _row_layout(self, head_size: int) -> None:  # the rows live in the cold array (layouts set at first write)
        return None

    # ---- tiers -------------------------------------------------------------------------------------------------
    def _ensure(self, kv_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The cold array of this layer (allocated at the first write: one cell per slot of vLLM's pool)."""
        if self.cold is not None and self.cold.shape[0] == kv_cache.shape[0] and self.cold.device == kv_cache.device:
            return self.cold
        rf = self.rf
        self.clay = _layout(rf.cold_format(dtype), self.head_size).to(kv_cache.device)
        self.slay = _layout(rf.summary_format(dtype), self.head_size).to(kv_cache.device)
        nb, h, bs = kv_cache.shape[0], kv_cache.shape[1], kv_cache.shape[2]
        if bs != rf.m or h != self.num_kv_heads:
            raise InvalidInput(f"kvslim recall: vLLM's page is [{nb}, {h}, {bs}, ...], expected {self.num_kv_heads} "
                               f"KV heads x m={rf.m} tokens")  # fmt: skip
        self.cold = torch.empty(nb, h, bs, 2 * self.clay.row_bytes, dtype=torch.uint8, device=kv_cache.device)
        first = not _STATS["layers"]
        _STATS["layers"][self.key] = {"pool_bytes": kv_cache.numel() * kv_cache.element_size(),
                                      "cold_bytes": self.cold.numel(), "cold_tokens": nb * bs}
        if first:
            _log.info("kvslim recall %s: vLLM's pages hold block summaries (%s) and pin stamps (%d B per block and "
                      "KV head), %d B per token and KV head; %d B per layer; the cold array holds every row (%s, %d B "
                      "per token and KV head; %d B per layer, %d tokens, on %s)", rf.recipe, self.slay.fmt,
                      rf.stamp_bytes, kv_cache.shape[3],
                      _STATS["layers"][self.key]["pool_bytes"], self.clay.fmt, 2 * self.clay.row_bytes,
                      self.cold.numel(), nb * bs, kv_cache.device)
        return self.cold

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        cold = self._ensure(kv_cache, key.dtype)
        n = slot_mapping.shape[0]
        write_slots(cold, self.clay, key[:n], value[:n], slot_mapping)
        bs = self.rf.m
        slots = slot_mapping[slot_mapping >= 0].to(torch.long)
        if self.rf.pin:  # blocks whose first slot was written: fresh or reused, any stamp in them is stale
            fresh = torch.unique(slots[slots % bs == 0] // bs)
            if fresh.numel():
                self._write_pages(kv_cache, fresh, self._stamp_at, torch.zeros(1, dtype=torch.uint8))
        done = torch.unique(slots[slots % bs == bs - 1] // bs)  # blocks whose last slot was written: complete
        if done.numel():
            self._summarize(kv_cache, cold, done)

    @property
    def _stamp_at(self) -> slice:
        """The bytes of a block's pin stamp in its page, per KV head (after the summary)."""
        at = self.rf.vectors * self.slay.row_bytes
        return slice(at, at + self.rf.stamp_bytes)

    @staticmethod
    def _write_pages(kv_cache: torch.Tensor, blocks: torch.Tensor, where: slice, data: torch.Tensor) -> None:
        """Write ``data`` (broadcast to ``[n, H, bytes]``) into bytes ``where`` of each KV head's region of the pages
        of ``blocks``, the other bytes kept."""
        n, h, bs, c = blocks.numel(), kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
        pages = kv_cache[blocks].reshape(n, h, bs * c)
        pages[..., where] = data
        kv_cache[blocks] = pages.reshape(n, h, bs, c)

    def _summarize(self, kv_cache: torch.Tensor, cold: torch.Tensor, blocks: torch.Tensor) -> None:
        """Summaries of complete ``blocks`` (from their cold keys) into their pages (their pin stamps kept)."""
        rf, r = self.rf, self.clay.row_bytes
        n, h = blocks.numel(), kv_cache.shape[1]
        keys = self.clay.decode(cold[blocks][..., :r])  # [n, H, bs, d] float32
        summ = summarize(rf.summary, keys.permute(1, 0, 2, 3)[None], None, rf.r)[0]  # [H, n, v, d]
        rows = self.slay.encode(summ.permute(1, 0, 2, 3))  # [n, H, v, Rs]
        self._write_pages(kv_cache, blocks, slice(0, rf.vectors * self.slay.row_bytes), rows.reshape(n, h, -1))

    def _summaries(self, pages: torch.Tensor) -> torch.Tensor:
        """Summaries ``[1, H, n, v, d]`` (float32) from the pages ``[n, H, bs * C]`` of ``n`` blocks."""
        v, rs = self.rf.vectors, self.slay.row_bytes
        summ = self.slay.decode(pages[..., : v * rs].reshape(pages.shape[0], pages.shape[1], v, rs))  # [n, H, v, d]
        return summ.permute(1, 0, 2, 3)[None]

    def stamps(self, pages: torch.Tensor) -> torch.Tensor:
        """The pin stamps ``int32 [n, H, 1 + pin]`` in the pages ``[n, H, bs * C]`` of ``n`` blocks."""
        return pages[..., self._stamp_at].contiguous().view(torch.int32)

    def pins(self, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's pins ``(blocks [H, pin], ok [H, pin])`` from the pages ``[n, H, bs * C]`` of its blocks (in
        its block table's order): per KV head the stamp at the largest position before ``length``."""
        st = self.stamps(pages)  # [n, H, 1 + P]
        off = st[..., 0].to(torch.long)
        pos = torch.arange(st.shape[0], device=st.device)[:, None] * self.rf.m + off - 1
        pos = torch.where((off > 0) & (off <= self.rf.m) & (pos < length), pos, -1)  # [n, H]
        best = pos.argmax(0)  # [H]
        pinned = st[best, torch.arange(st.shape[1], device=st.device), 1:].to(torch.long)  # [H, P]
        ok = (pos.amax(0) >= 0)[:, None] & (pinned >= 0)
        return pinned.clamp_min(0), ok

    def pick_pins(self, q: torch.Tensor, cold: torch.Tensor, blocks: torch.Tensor, length: int
                  ) -> torch.Tensor | None:
        """The stamp ``int32 [H, 1 + pin]`` of a request whose last query row ``q [Hq, d]`` is at ``length - 1``:
        its ``pin`` blocks per KV head of highest exact log-sum-exp (over each block's rows but the sinks, the
        group's heads by max) among the blocks wholly before its window (``pinw=1``: every whole block), at most
        as many as there are of those; ``None`` when none is out of the window."""
        rf, m = self.rf, self.rf.m
        nt = max(0, (length - rf.w) // m)
        if not rf.pin or nt == 0:
            return None
        upto = length // m if rf.pinw else nt
        h, d = self.num_kv_heads, self.head_size
        keys = self.clay.decode(cold[blocks[:upto].to(torch.long)][..., : self.clay.row_bytes])  # [upto, H, m, d]
        qf = q.to(torch.float32).reshape(h, self.num_heads // h, d)
        logits = torch.einsum("hgd,jhmd->hgjm", qf, keys) * self.scale
        pos = torch.arange(upto * m, device=q.device).reshape(upto, m)
        logits = logits.masked_fill(pos < rf.sinks, float("-inf"))
        lse = torch.logsumexp(logits, -1).amax(1)  # [H, upto]
        top = lse.topk(min(rf.pin, nt), dim=-1)
        stamp = torch.full((h, 1 + rf.pin), -1, dtype=torch.int32, device=q.device)
        stamp[:, 0] = (length - 1) % m + 1
        stamp[:, 1 : 1 + top.indices.shape[-1]] = torch.where(torch.isfinite(top.values), top.indices, -1).to(torch.int32)
        return stamp

    # ---- attention ---------------------------------------------------------------------------------------------
    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KvslimMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvslim's vLLM backend does not fuse output quantization")
        if attn_metadata is None or kv_cache.numel() == 0:  # profiling / warm-up run
            return output
        cold = self._ensure(kv_cache, query.dtype)
        m = attn_metadata
        n = m.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        qsl, lens = m.query_start_loc.tolist(), m.seq_lens.tolist()
        dense = list(lens)  # requests attended exactly over all rows (others: length 0 there)
        fetched_step = 0
        for i, length in enumerate(lens):
            if qsl[i + 1] - qsl[i] != 1 or length <= 0:
                if length > 0 and qsl[i + 1] > qsl[i]:
                    _STATS["prefill_calls"] += 1
                continue
            sel = self._select(q[qsl[i]], kv_cache, m.block_table[i], length)
            fetched_step += self._count(sel, length)
            if sel is not None:
                self._attend(q[qsl[i]], cold, m.block_table[i], sel, length, out, qsl[i])
                dense[i] = 0
        _STATS["step_fetched_bytes_max"] = max(_STATS["step_fetched_bytes_max"], fetched_step)
        if any(dense):
            paged_attention(q, cold, self.clay, m.block_table, torch.tensor(dense), m.query_start_loc, self.scale,
                            out=out, from_codes=self.from_codes and cold.device.type == "cpu")
        if self.rf.pin:  # each multi-row request's last row pins; the stamp goes to the page of that row's block
            for i, length in enumerate(lens):
                if qsl[i + 1] - qsl[i] < 2 or length <= 0:
                    continue
                stamp = self.pick_pins(q[qsl[i + 1] - 1], cold, m.block_table[i], length)
                if stamp is not None:
                    home = m.block_table[i, (length - 1) // self.rf.m].to(torch.long).reshape(1)
                    self._write_pages(kv_cache, home, self._stamp_at, stamp.view(torch.uint8)[None])
                    _STATS["pin_stamps"] += 1
        return output

    def _select(self, q: torch.Tensor, kv_cache: torch.Tensor, blocks: torch.Tensor, length: int
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Blocks one decode query ``q [Hq, d]`` fetches: ``(idx [H, K], ok [H, K])`` (ascending among the ``ok``
        ones, of the blocks wholly before the window); ``None``: every token is attended."""
        rf, bs = self.rf, self.rf.m
        nt = max(0, (length - rf.w) // bs)  # blocks wholly before the recent window
        if nt == 0 or rf.k == 0 or rf.k * (2 * rf.nbr + 1) >= nt:
            return None
        na = -(-length // bs) if rf.pin else nt  # pins: the stamps of every block of the request
        h, c = kv_cache.shape[1], kv_cache.shape[3]
        pages = kv_cache[blocks[:na].to(torch.long)].reshape(na, h, bs * c)
        summ = self._summaries(pages[:nt])
        scores = score_blocks(rf.summary, q.to(torch.float32)[None, :, None, :], summ, rf.gqa)  # [1, H, 1, nt]
        if rf.pin:  # pinned blocks (each with the span - 1 after it) first: above every summary score
            pinned, ok = self.pins(pages, length)
            if bool(ok.any()):
                marks = torch.zeros(h, nt + 1, dtype=torch.bool, device=q.device)
                for o in range(min(rf.span, nt)):
                    marks.scatter_(1, torch.where(ok, (pinned + o).clamp_max(nt), nt), True)
                top = scores.abs().amax(-1, keepdim=True) + 1.0
                scores = torch.where(marks[None, :, None, :nt], 2 * top + scores.abs(), scores)
                _STATS["pinned_decodes"] += 1
        visible = torch.ones(1, 1, 1, nt, dtype=torch.bool, device=q.device)
        idx, ok = select_blocks(scores, visible, rf.k, rf.nbr)
        return idx[0, :, 0], ok[0, :, 0]

    def _count(self, sel: tuple[torch.Tensor, torch.Tensor] | None, length: int) -> int:
        """Count one decode's rows: fetched blocks (their rows that are not sinks), sinks + window, context.
        Returns the fetched bytes."""
        rf, h = self.rf, self.num_kv_heads
        nt = max(0, (length - rf.w) // rf.m)
        nbase = (length - nt * rf.m + min(rf.sinks, nt * rf.m)) * h  # sinks and everything from block nt on
        if sel is None:
            fetched = length * h - nbase
        else:
            idx, ok = sel
            cover = (idx[..., None] * rf.m + torch.arange(rf.m, device=idx.device)) < rf.sinks  # sink rows in them
            fetched = int(ok.sum()) * rf.m - int((cover & ok[..., None]).sum())
        cell = 2 * self.clay.row_bytes
        _STATS["decode_calls"] += 1
        _STATS["context_rows"] += length * h
        _STATS["fetched_rows"] += fetched
        _STATS["window_rows"] += nbase
        _STATS["fetched_bytes"] += fetched * cell
        _STATS["window_bytes"] += nbase * cell
        return fetched * cell

    def _attend(self, q: torch.Tensor, cold: torch.Tensor, blocks: torch.Tensor,
                sel: tuple[torch.Tensor, torch.Tensor], length: int, out: torch.Tensor, row: int) -> None:
        """Exact attention of one query ``q [Hq, d]`` over the sinks, the chosen blocks and the window, their rows
        gathered from ``cold`` (a sink inside a chosen block is taken once)."""
        rf, r = self.rf, self.clay.row_bytes
        bs, dev = rf.m, q.device
        idx, ok = sel
        h = idx.shape[0]
        nt = max(0, (length - rf.w) // bs)
        s = min(rf.sinks, nt * bs)
        blk = idx[..., None] * bs + torch.arange(bs, device=dev)  # [H, K, bs] token positions
        sinks = torch.arange(s, device=dev)
        chosen = torch.zeros(h, nt + 1, dtype=torch.bool, device=dev).scatter_(1, torch.where(ok, idx, nt), True)
        pos = torch.cat([sinks.expand(h, s), blk.reshape(h, -1),
                         torch.arange(nt * bs, length, device=dev).expand(h, length - nt * bs)], 1)  # [H, P]
        valid = torch.cat([~chosen[:, sinks // bs], ok[..., None].expand(blk.shape).reshape(h, -1),
                           torch.ones(h, length - nt * bs, dtype=torch.bool, device=dev)], 1)
        slot_blk = blocks.to(torch.long)[pos // bs]  # [H, P]
        heads = torch.arange(h, device=dev)[:, None]
        cells = cold[slot_blk, heads, pos % bs]  # [H, P, 2R]
        g = self.num_heads // h
        qf = q.to(torch.float32).reshape(h, g, self.head_size)
        if self.from_codes and cells.device.type == "cpu" and self.clay.codec.attends_from_codes:
            o = _from_codes(qf, cells, self.clay, valid[:, None, :], self.scale)  # kvslim's lookup kernel
            out[row] = o.reshape(self.num_heads, self.head_size).to(out.dtype)
            return
        k = self.clay.decode(cells[..., :r])
        v = self.clay.decode(cells[..., r:])
        sc = torch.einsum("hgd,hpd->hgp", qf, k) * self.scale
        sc = sc.masked_fill(~valid[:, None, :], float("-inf"))
        o = torch.einsum("hgp,hpd->hgd", torch.softmax(sc, dim=-1), v)
        out[row] = o.reshape(self.num_heads, self.head_size).to(out.dtype)
