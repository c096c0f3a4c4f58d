"""``recall``: tiered recall. Block summaries + exact window hot, every exact token cold, top-k blocks fetched.

After Quest (Tang et al. 2024: per-page min/max keys bound ``q . k``), InfLLM (representative keys per block) and
ShadowKV / ArkVale (exact tokens off the GPU, only the selected blocks fetched). With ``S`` sinks, a window ``W``
and blocks of ``m`` tokens (the column rule of :mod:`kvslim.cache.base` with unit ``m``), a global layer keeps

* **hot** (``nbytes()``): sinks (model dtype), the exact window (16-bit with a codec, ``wq=1``: through it) and one
  summary per block that left the window (``mean`` | ``bbox`` | ``reps``, :mod:`kvslim.cache.methods.recall.summaries`), stored
  through the recipe's codec;
* **cold** (:mod:`kvslim.cache.methods.recall.cold`): the K/V of every token that left the window, in ``ram`` or on ``disk``,
  through the ``cold`` codec (``none`` = exact).

A decode query at column ``t`` scores the ``n(t)`` blocks out of its window per KV head (the group's query heads
combined by ``gqa``), fetches the exact tokens of the top ``k`` (+ ``nbr`` neighbours each side) and attends
exactly over sinks + fetched tokens + window; the bytes fetched are counted (``tier_nbytes()["fetched"]``). With
``rest=mean`` every block not fetched still enters that attention as one entry, its mean key and mean value (held
hot, through the codec) with the log of its token count added to the logit (the count of tokens it stands for), so
a layer whose attention spreads over many blocks keeps that mass approximately instead of losing it.
Prefill: ``dense`` (default) attends exactly to every earlier token, the cold tier read chunk by chunk and merged
by log-sum-exp (:mod:`kvslim.cache.methods.recall.segments`), and with ``pin=P`` the ``P`` blocks per KV head the call's last query
attended most (exact log-sum-exp over each block's tokens, the query heads of a group combined by max) are pinned:
every later decode step fetches them (with ``span=2`` each with the block after it, where the value of a key that
ends a block goes on) in place of ``P x span`` of its top-``k`` blocks, so what the prompt's last token found
stays in view while the answer is decoded (a later multi-token call re-pins); ``select`` applies the decode rule to every prefill query, so
what a query sees depends only on its column: one-shot == chunked == token-by-token. ``dense`` agrees over chunks
of two or more tokens; a one-token forward is a decode step (it selects). ``k=0`` (all blocks) is lossless.
Index letters: b batch, h KV head, g group, s queries, n tokens, j blocks, d dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ....errors import InvalidInput
from ....formats import REGISTRY
from ...base import BaseLayer, LayerSpec, Segment, View, stream_nbytes
from ...method import Method, Params, param, register
from ...storage import Store
from ..window import sinks_param, window_param, wq_param
from .cold import COLD_STORES, ColdTier, check_cold_codec, check_folder, cold_codecs
from .segments import attend_segment, block_lse, merge
from .summaries import GQA_MODES, SUMMARIES, score_blocks, select_blocks, summarize, vectors_per_block

__all__ = ["Recall", "RecallLayer", "RecallParams", "RecallSpec"]

AUTO = -1  # pin / span default: resolved by RecallParams (what a plain `recall` keeps: issue 24, part 5)
AUTO_PIN, AUTO_SPAN = 4, 2  # auto pins: 4 blocks per KV head, each with the block after it (the recall-fp8 preset's)
_Q_CHUNK = 512  # prefill queries per attention pass
_K_CHUNK = 2048  # tokens per segment read from the cold tier or the window


@dataclass(frozen=True)
class RecallParams(Params):
    m: int = param(32, "tokens per block (one summary each)", lo=1)
    k: int = param(12, "blocks fetched per query and KV head (0 = all: lossless)", lo=0)
    w: int = window_param(128)
    sinks: int = sinks_param()
    summary: str = param("bbox", "block summary: mean | bbox (Quest min/max bound) | reps (r keys)", choices=SUMMARIES)
    r: int = param(2, "reps: representative keys per block (at most m)", lo=1)
    nbr: int = param(0, "neighbour blocks fetched on each side of a selected block", lo=0)
    pin: int = param(AUTO, "blocks per KV head pinned by the last prefill query's exact attention (of the k "
                     f"fetched; -1 = auto: {AUTO_PIN} with prefill=dense and k >= {AUTO_PIN * AUTO_SPAN}, else 0)",
                     lo=AUTO)  # fmt: skip
    span: int = param(AUTO, "blocks pinned from each pinned block on (2: it and the next, where a key's value may lie;"
                      f" -1 = auto: {AUTO_SPAN} with auto pins, else 1)", lo=AUTO)  # fmt: skip
    pinw: int = param(0, "1: pins are ranked over the whole blocks still in the window too (such a pin takes effect "
                      "when its block leaves the window while the answer is decoded); 0: over blocks out of it",
                      choices=(0, 1))  # fmt: skip
    hold: int = param(0, "blocks per KV head held for the next decode step (of the k, fetched before those chosen by "
                      "summary): those the previous query attended most, exactly (a prefill's last query: the best "
                      "after the pins; a decode step: the best of its fetched blocks, pins aside)", lo=0)  # fmt: skip
    rest: str = param("none", "blocks not fetched: none (left out) | mean (one entry each: mean key and value, "
                      "weighted by its token count)", choices=("none", "mean"))  # fmt: skip
    gqa: str = param("max", "combine a KV group's query heads: max | sum | union (each head's top blocks in turn)",
                     choices=GQA_MODES)  # fmt: skip
    store: str = param("ram", "cold tier: ram | disk (memory-mapped files)", choices=COLD_STORES)
    cold: str = param("none", "codec of the cold tier: none (exact), fp16, bf16, fp8, fp4, tq1..tq4, tqprod2..4")
    dir: str = param("", "disk: folder of the cold files (default: a temporary folder removed with the cache)")
    prefill: str = param("dense", "prefill: dense (exact, cold read in chunks) | select (top-k per query)",
                         choices=("dense", "select"))  # fmt: skip
    wq: int = wq_param()

    # the defaults records were written against before pins became the default (issue 24): canonical strings
    # omit these values, so `recall-fp8` stays `recall:k=12,pin=4,span=2+fp8` and a stored `recall` row keeps k=8
    recorded: ClassVar[dict[str, Any]] = {"k": 8, "pin": 0, "span": 1}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pin == AUTO or self.span == AUTO:  # resolve auto (the defaults) to values: what records hold
            auto = self.pin == AUTO
            pin = (AUTO_PIN if self.prefill == "dense" and self.k >= AUTO_PIN * AUTO_SPAN else 0) if auto else self.pin
            span = (AUTO_SPAN if auto and pin else 1) if self.span == AUTO else self.span
            object.__setattr__(self, "pin", pin)
            object.__setattr__(self, "span", span)
        if self.span < 1:
            raise InvalidInput(f"recall: span must be positive (or -1: auto), got {self.span}")
        if self.cold not in cold_codecs():
            raise InvalidInput(f"recall: cold must be one of {', '.join(cold_codecs())}, got {self.cold!r}")
        if self.dir and self.store != "disk":
            raise InvalidInput("recall: dir= names the folder of the disk store; add store=disk")
        if self.pin and (self.prefill != "dense" or (self.k and self.pin * self.span > self.k)):
            raise InvalidInput(f"recall: pin={self.pin} needs prefill=dense and pin x span <= k "
                               f"(span={self.span}, k={self.k})")  # fmt: skip
        if self.hold and (not self.k or self.pin * self.span + self.hold > self.k):
            raise InvalidInput(f"recall: hold={self.hold} needs k > 0 and pin x span + hold <= k "
                               f"(pin={self.pin}, span={self.span}, k={self.k})")  # fmt: skip
        if self.pinw and not self.pin:
            raise InvalidInput("recall: pinw=1 chooses where pins may fall; add pin=P (or leave pin to auto)")
        if self.rest != "none" and self.prefill != "dense":
            raise InvalidInput(f"recall: rest={self.rest} needs prefill=dense (a selecting prefill leaves blocks out)")
        if self.span > 1 and not self.pin:
            raise InvalidInput(f"recall: span={self.span} extends pinned blocks; add pin=P")
        if self.summary == "reps" and self.r > self.m:  # r summary vectors per block: never more than its keys
            raise InvalidInput(f"recall: r={self.r} representative keys per block exceeds the block's m={self.m} "
                               f"tokens; use r <= m (r=m keeps every key: exact scores)")  # fmt: skip


@dataclass(frozen=True)
class RecallSpec(LayerSpec):
    """A tiered layer: ``p`` its parameters (block ``p.m``, top ``p.k``, summary kind, cold store and codec)."""

    p: RecallParams = RecallParams()

    def layer_class(self) -> type[BaseLayer]:
        return RecallLayer


@dataclass
class RecallView(View):
    """A recall call's view: the decoded sinks and window, and ``n_next`` blocks out of the window after the call."""

    n_next: int


@register
class Recall(Method):
    name = "recall"
    family = "recall"
    summary = "tiered: block summaries + window hot, exact tokens cold, top-k blocks fetched per query"
    Params = RecallParams
    lossless = ({"m": 4, "k": 0, "w": 16, "sinks": 2}, {"m": 4, "k": 0, "w": 16, "store": "disk", "prefill": "select"})
    # prefill=select: every query follows the decode rule, so one-shot == chunked == token-by-token; the default
    # prefill=dense is invariant over chunks of 2+ tokens only (a 1-token forward is a decode step: it selects)
    examples = ({"m": 4, "k": 2, "w": 8, "sinks": 2, "prefill": "select"},
                {"m": 4, "k": 1, "w": 8, "sinks": 2, "summary": "reps", "nbr": 1, "prefill": "select"})  # fmt: skip

    def check(self, shape: Any) -> list[str]:
        reasons = super().check(shape)
        try:
            check_cold_codec(self.params.cold, shape.head_dim)
            if self.params.dir:
                check_folder(self.params.dir)
        except InvalidInput as e:
            reasons.append(str(e))
        return reasons

    def global_spec(self, index: int) -> RecallSpec:
        p = self.params
        return RecallSpec(window=p.w, sinks=p.sinks, codec=self.codec, window_codec=self.window_codec(),
                          label=self.name, p=p)  # fmt: skip

    def prepare(self, model: Any, specs: list[Any], tokenizer: Any = None) -> dict[int, dict[str, Any]]:
        """One cold tier for the whole cache (its folder and files), shared by the tiered layers."""
        tier = ColdTier(self.params.store, self.params.dir or None)
        return {i: {"tier": tier} for i, s in enumerate(specs) if isinstance(s, RecallSpec)}


class RecallLayer(BaseLayer):
    """Sinks + exact window + block summaries (hot); exact K/V of the blocks out of the window (cold)."""

    spec: RecallSpec

    @classmethod
    def unit(cls, spec: RecallSpec) -> tuple[int, int]:
        return spec.p.m, 0

    def init_state(self) -> None:
        p = self.spec.p
        self.v = vectors_per_block(p.summary, p.r)
        self.summ = Store(self.ck, self.dtype)  # [b, h, blocks * v, d] through the recipe's codec
        if p.rest == "mean":  # [b, h, blocks, d]: mean key and mean value of every block out of the window
            self.rest_k, self.rest_v = Store(self.ck, self.dtype), Store(self.cv, self.dtype)
        cc = check_cold_codec(p.cold, self.dim)
        tier: ColdTier = self.ctx.extras["tier"]
        self.cold_k = tier.stream(f"layer{self.ctx.index}.k", cc, self.dtype, self.device)
        self.cold_v = tier.stream(f"layer{self.ctx.index}.v", cc, self.dtype, self.device)
        self.blk_valid = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)
        self.cold_valid: torch.Tensor | None = None  # [b, cold tokens], held once padding was seen
        self.n_blocks = 0
        self.fetched = self.fetched_tokens = 0  # by the last forward call (tokens: per KV head)
        if p.pin:  # blocks pinned by the last prefill query [b, h, min(pin, blocks)] and which slots hold one
            self.pinned = torch.zeros(self.batch, self.heads, 0, dtype=torch.long, device=self.device)
            self.pin_ok = torch.zeros(self.batch, self.heads, 0, dtype=torch.bool, device=self.device)
        if p.hold:  # blocks held from the previous query [b, h, min(hold, blocks)] and which slots hold one
            self.held = torch.zeros(self.batch, self.heads, 0, dtype=torch.long, device=self.device)
            self.held_ok = torch.zeros(self.batch, self.heads, 0, dtype=torch.bool, device=self.device)

    def _grow_held(self, n_blocks: int) -> None:
        """Hold slots for ``min(hold, n_blocks)`` blocks (new slots hold nothing), as :meth:`_grow_pins`."""
        add = min(self.spec.p.hold, n_blocks) - self.held.shape[-1]
        if add > 0:
            self.held = torch.cat([self.held, self.held.new_zeros(self.batch, self.heads, add)], -1)
            self.held_ok = torch.cat([self.held_ok, self.held_ok.new_zeros(self.batch, self.heads, add)], -1)

    def _grow_pins(self, n_blocks: int) -> None:
        """Pin slots for ``min(pin, n_blocks)`` blocks (no more blocks than exist can be pinned: a huge ``pin``
        allocates nothing it cannot use); new slots hold no pin."""
        add = min(self.spec.p.pin, n_blocks) - self.pinned.shape[-1]
        if add > 0:
            self.pinned = torch.cat([self.pinned, self.pinned.new_zeros(self.batch, self.heads, add)], -1)
            self.pin_ok = torch.cat([self.pin_ok, self.pin_ok.new_zeros(self.batch, self.heads, add)], -1)

    # ---- what is held ----------------------------------------------------------------------------------------
    def stores(self) -> list[Store]:
        return [*super().stores(), self.summ, *([self.rest_k, self.rest_v] if self.spec.p.rest == "mean" else [])]

    def side_tensors(self) -> list[str]:
        p = self.spec.p
        return [*super().side_tensors(), "blk_valid", "cold_valid", *(["pinned", "pin_ok"] if p.pin else []),
                *(["held", "held_ok"] if p.hold else [])]  # fmt: skip

    def stored_length(self) -> int:  # every token can be attended (fetched from the cold tier)
        return self.seen if self.is_initialized else 0

    def _select(self, fn: Any) -> None:
        super()._select(fn)
        if self.is_initialized:
            self.cold_k.select_batch(fn)
            self.cold_v.select_batch(fn)

    def tier_nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"hot": 0, "cold": 0, "fetched": 0}
        return {"hot": self.nbytes(), "cold": self.cold_k.nbytes() + self.cold_v.nbytes(), "fetched": self.fetched}

    def close(self) -> None:
        """Remove the cache's cold files (and its temporary folder)."""
        self.ctx.extras["tier"].close()

    @classmethod
    def predict(cls, spec: RecallSpec, n: int, shape: Any, batch: int = 1) -> dict[str, int]:
        """``stored`` = hot bytes; ``cold``; ``read`` = hot K/V + summaries + the fetched tokens of one decode step."""
        from ....formats import vectors_nbytes

        c, p = cls.counts(spec, n), spec.p
        d = shape.head_dim
        hot = stream_nbytes(shape, "none", d, c["sinks"], batch) + stream_nbytes(shape, spec.tail_codec(), d, c["tail"], batch)
        fmt = shape.dtype if spec.codec == "none" else spec.codec
        summ = batch * shape.kv_heads * vectors_nbytes(fmt, d, c["units"] * vectors_per_block(p.summary, p.r), "key")
        if p.rest == "mean":
            summ += batch * shape.kv_heads * (vectors_nbytes(fmt, d, c["units"], "key") + vectors_nbytes(fmt, d, c["units"], "value"))
        cold_fmt = shape.dtype if p.cold == "none" else p.cold
        cold = stream_nbytes(shape, cold_fmt, d, c["units"] * p.m, batch)
        fetched_tokens = min(c["units"], (p.k or c["units"]) * (2 * p.nbr + 1)) * p.m
        fetched = stream_nbytes(shape, cold_fmt, d, fetched_tokens, batch)
        side = batch * (c["sinks"] + c["tail"] + c["units"]
                        + shape.kv_heads * (min(p.pin, c["units"]) + min(p.hold, c["units"])) * 9)  # pins, held: int64 + flag
        attended = c["sinks"] + c["tail"] + fetched_tokens
        return {"stored": hot + summ + side, "read": hot + summ + fetched, "cold": cold, "fetched": fetched,
                "flops": 4 * batch * shape.heads * d * attended}  # fmt: skip

    # ---- storing ---------------------------------------------------------------------------------------------
    def ingest(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        if not self.has_padding and not bool(valid.all()):
            self.cold_valid = torch.ones(self.batch, self.n_blocks * self.m, dtype=torch.bool, device=self.device)
        super().ingest(k, v, pos, valid)

    def _block_summaries(self, tail_k: torch.Tensor, upto: int) -> torch.Tensor:
        """Summaries ``[b, h, nb, v, d]`` of blocks ``n_blocks .. upto-1`` (the front of the decoded tail)."""
        nb = upto - self.n_blocks
        keys = tail_k[:, :, : nb * self.m].reshape(self.batch, self.heads, nb, self.m, self.dim)
        valid = self.tail_valid[:, : nb * self.m].reshape(self.batch, nb, self.m)
        return summarize(self.spec.p.summary, keys, valid, self.spec.p.r)

    def _move_out(self, upto: int, tail_k: torch.Tensor, tail_v: torch.Tensor) -> None:
        """Blocks ``n_blocks .. upto-1``: summaries to the hot index, exact K/V to the cold tier, off the window."""
        nb = upto - self.n_blocks
        if nb <= 0:
            return
        n = nb * self.m
        summ = self._block_summaries(tail_k, upto)
        self.summ.append(summ.reshape(self.batch, self.heads, nb * self.v, self.dim).to(self.dtype))
        if self.spec.p.rest == "mean":
            valid = self.tail_valid[:, :n].reshape(self.batch, nb, self.m)
            for store, x in ((self.rest_k, tail_k), (self.rest_v, tail_v)):
                blocks = x[:, :, :n].reshape(self.batch, self.heads, nb, self.m, self.dim)
                store.append(summarize("mean", blocks, valid)[:, :, :, 0].to(self.dtype))
        self.cold_k.append(tail_k[:, :, :n])
        self.cold_v.append(tail_v[:, :, :n])
        valid = self.tail_valid[:, :n]
        self.blk_valid = torch.cat([self.blk_valid, valid.reshape(self.batch, nb, self.m).any(-1)], 1)
        if self.cold_valid is not None:
            self.cold_valid = torch.cat([self.cold_valid, valid], 1)
        self.n_blocks = upto
        if self.spec.p.pin:
            self._grow_pins(upto)
        if self.spec.p.hold:
            self._grow_held(upto)
        self.trim(upto)

    def _summaries(self, upto: int, tail_k: torch.Tensor | None) -> torch.Tensor:
        """Summaries of blocks ``0 .. upto-1`` as the summary store gives them back (new ones through its codec)."""
        s = self.summ.decode()
        s = None if s is None else s.reshape(self.batch, self.heads, -1, self.v, self.dim)
        if upto <= self.n_blocks:
            return s[:, :, :upto]
        new = self._block_summaries(tail_k, upto)
        x = new.reshape(self.batch, self.heads, -1, self.dim).to(self.dtype)
        fmt = REGISTRY.get(self.spec.codec)
        if fmt is not None and fmt.append_only:  # KIVI: the newest vectors are held in fp16 until a group fills
            x = x.half().to(self.dtype)
        else:
            x = self.ck.decode(self.ck.encode(x)).to(self.dtype)
        new = x.reshape(new.shape)
        return new if s is None else torch.cat([s, new], 2)

    # ---- attention (the base template: take_pending -> prepare -> attend_view -> finish) -------------------------
    def prepare(self, q: int, p0: int) -> RecallView:
        """The exact tokens this call reads (sinks and window, decoded) and the blocks out of the window after it."""
        n_next = self.n_out(self.seen)
        tail_k, tail_v = self.tail_k.decode(), self.tail_v.decode()
        sink_k, sink_v = self.sink_k.decode(), self.sink_v.decode()
        self.fetched = self.fetched_tokens = 0
        return RecallView(q, p0, sink_k, sink_v, tail_k, tail_v, n_next)

    def attend_view(self, query: torch.Tensor, view: RecallView, scaling: float,
                    softcap: float | None) -> torch.Tensor:  # fmt: skip
        """A decode step attends over its segments (sinks, the fetched blocks, the rest, the window); a prefill call
        over sinks, cold tier and window chunk by chunk, merged by log-sum-exp (then pins). ``-> [b, q, h*g, d]``."""
        sinks, tail = (view.sink_k, view.sink_v), (view.tail_k, view.tail_v)
        if view.q == 1:
            out = self._decode_step(query, scaling, softcap, sinks, tail)
        else:
            out = self._prefill(query, view.p0, view.n_next, scaling, softcap, sinks, tail)
            if self.spec.p.hold:  # a new prompt (a question): what the last answer attended is held no more
                self.held_ok.zero_()
            if (self.spec.p.pin or self.spec.p.hold) and self.spec.p.prefill == "dense" and view.n_next > 0:
                self._pin(query[:, :, -1:], view.n_next, view.tail_k, scaling, softcap)
        return out.transpose(1, 2)

    def finish(self, view: RecallView) -> None:
        """Blocks that left the window: summaries to the hot index, exact tokens to the cold tier."""
        self._move_out(view.n_next, view.tail_k, view.tail_v)

    def _decode_step(self, query, scaling, softcap, sinks, tail) -> torch.Tensor:
        """One decode query over :meth:`_decode_segments`, one softmax over them all -> ``[b, h*g, 1, d]``."""
        return self._attend_decode(query, self._decode_segments(query, sinks, tail, scaling, softcap), scaling, softcap)

    def _decode_segments(self, query, sinks, tail, scaling: float = 1.0, softcap: float | None = None) -> list[Segment]:
        """What a decode query attends to, masks ``[b, h, 1, n]``: the sinks, the exact tokens of the blocks it
        fetches from the cold tier (top ``k`` by summary score, pinned blocks first), with ``rest=mean`` one entry
        per block not fetched (``meta``: its token count), and the window."""
        b = query.shape[0]
        h, m, p = self.heads, self.m, self.spec.p
        segs = []
        if sinks[0] is not None:
            segs.append(Segment(*sinks, self.sink_valid[:, None, None, :].expand(b, h, 1, -1), name="sinks"))
        nt = self.n_out(self.seen - 1)
        if nt > 0:
            scores = score_blocks(p.summary, query, self._summaries(nt, None), p.gqa)
            top = scores.abs().amax(-1, keepdim=True) + 1.0  # above every summary score
            if p.pin:  # pinned blocks first: above every summary score
                pins = torch.zeros(b, h, nt + 1, dtype=torch.bool, device=query.device)
                for o in range(min(p.span, nt)):  # each pinned block and the span - 1 after it (those out of the window)
                    pins.scatter_(2, torch.where(self.pin_ok, (self.pinned + o).clamp_max(nt), nt), True)
                scores = torch.where(pins[:, :, None, :nt], 2 * top + scores.abs(), scores)
            if p.hold:  # blocks held from the previous step next: below the pins, above every summary score
                held = torch.zeros(b, h, nt + 1, dtype=torch.bool, device=query.device)
                held.scatter_(2, torch.where(self.held_ok, self.held.clamp_max(nt), nt), True)
                mark = held[:, :, None, :nt] & (scores < top)  # a pinned block stays pinned
                scores = torch.where(mark, top + scores.abs() / (2 * top), scores)
            idx, ok = select_blocks(scores, self.blk_valid[:, None, None, :nt], p.k or nt, p.nbr)  # [b, h, 1, K]
            rows = (idx[:, :, 0, :, None] * m + torch.arange(m, device=idx.device)).reshape(b, h, -1)
            before = self.cold_k.fetched_bytes + self.cold_v.fetched_bytes
            fk, fv = self.cold_k.fetch(rows), self.cold_v.fetch(rows)
            self.fetched = self.cold_k.fetched_bytes + self.cold_v.fetched_bytes - before
            self.fetched_tokens = int(ok.sum()) * m // (b * h)
            tok_ok = ok[:, :, 0, :, None].expand(b, h, idx.shape[-1], m).reshape(b, h, 1, -1)
            if self.cold_valid is not None:
                tok_ok = tok_ok & self.cold_valid.gather(1, rows.reshape(b, -1)).reshape(b, h, 1, -1)
            segs.append(Segment(fk, fv, tok_ok, name="fetched"))
            if p.hold:
                self._hold(query, fk, tok_ok, idx[:, :, 0], ok[:, :, 0], pins[:, :, :nt] if p.pin else None,
                           scaling, softcap)
            if p.rest == "mean":
                rest_ok = self.blk_valid[:, None, :nt] & ~torch.zeros(b, h, nt, dtype=torch.bool, device=query.device
                                                                      ).scatter_(2, idx[:, :, 0], ok[:, :, 0])
                counts = torch.full((b, nt), float(m)) if self.cold_valid is None else \
                    self.cold_valid[:, : nt * m].reshape(b, nt, m).sum(-1).float()
                segs.append(Segment(self.rest_k.decode()[:, :, :nt], self.rest_v.decode()[:, :, :nt],
                                    rest_ok[:, :, None], name="rest", meta=counts))  # fmt: skip
        if tail[0] is not None:
            segs.append(Segment(*tail, self.tail_valid[:, None, None, :].expand(b, h, 1, -1), name="window"))
        return segs

    def _hold(self, query, fk, tok_ok, idx, ok, pins, scaling, softcap) -> None:
        """Hold, for the next decode step, the ``hold`` fetched blocks (pinned ones aside) this step's query attends
        most: per KV head the largest over its query heads of the exact log-sum-exp over each block's fetched tokens
        (the step's scaling and softcap)."""
        b, h, nk = idx.shape
        m = self.m
        g = query.shape[1] // h
        logits = torch.matmul(query.float().reshape(b, h, g, -1), fk.float().transpose(-1, -2)) * scaling  # [b,h,g,nk*m]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~tok_ok[:, :, 0][:, :, None], float("-inf"))
        lse = torch.logsumexp(logits.reshape(b, h, g, nk, m), -1).amax(2)  # [b, h, nk]
        cand = ok if pins is None else ok & ~pins.gather(2, idx)
        lse = lse.masked_fill(~cand, float("-inf"))
        top = lse.topk(min(self.held.shape[-1], nk), dim=-1)
        self.held.zero_()
        self.held_ok.zero_()
        n = top.indices.shape[-1]
        self.held[..., :n] = idx.gather(2, top.indices)
        self.held_ok[..., :n] = torch.isfinite(top.values)

    def _attend_decode(self, query, segs, scaling, softcap) -> torch.Tensor:
        """The decode query over ``segs`` joined: sdpa with an additive mask (and, for the ``rest`` entries, the log
        of the token count each stands for)."""
        b, hq = query.shape[:2]
        h = self.heads
        K, V = torch.cat([g.k for g in segs], 2), torch.cat([g.v for g in segs], 2)
        M = torch.cat([g.mask for g in segs], 3)
        extra = None  # rest=mean: log(token count) on the entries of the blocks not fetched
        rest = [i for i, g in enumerate(segs) if g.name == "rest"]
        if rest:
            rest_at, counts = sum(g.k.shape[2] for g in segs[: rest[0]]), segs[rest[0]].meta
            extra = torch.zeros(b, 1, 1, K.shape[2], dtype=torch.float32, device=query.device)
            extra[..., rest_at : rest_at + counts.shape[1]] = counts.clamp_min(1).log().to(query.device)[:, None, None]
        if softcap is not None:
            return attend_segment(query, K, V, M, scaling, softcap, extra)[0].to(query.dtype)
        bias = None
        if not bool(M.all()) or extra is not None:
            M = M | ~M.any(-1, keepdim=True)  # an all-padding row: attend anywhere, the output is unused
            bias = torch.zeros(M.shape, dtype=query.dtype, device=query.device).masked_fill_(~M, float("-inf"))
            if extra is not None:
                bias = bias + extra.to(query.dtype)
            bias = bias[:, :, None].expand(b, h, hq // h, 1, K.shape[2]).reshape(b, hq, 1, -1)
        return F.scaled_dot_product_attention(query, K, V, attn_mask=bias, scale=scaling, enable_gqa=True)

    def _pin(self, q: torch.Tensor, n_next: int, tail_k: torch.Tensor, scaling: float, softcap: float | None) -> None:
        """Pin the ``pin`` blocks of ``0 .. n_next-1`` (``pinw=1``: of every whole block) the query ``q [b, h*g, 1, d]``
        attends most, per KV head (at most ``n_next`` pins: the slots held)."""
        m, parts = self.m, []
        for a in range(0, self.n_blocks * m, _K_CHUNK):
            e = min(self.n_blocks * m, a + _K_CHUNK)
            valid = None if self.cold_valid is None else self.cold_valid[:, a:e]
            parts.append(block_lse(q, self.cold_k.read(a, e), valid, m, scaling, softcap))
        # pinw=1: every whole block of the window is a candidate too; a pin on one is inert until the block leaves
        # the window (the decode step drops pins >= its blocks out), so a needle near the prompt's end stays in view
        upto = (self.seen - self.spec.sinks) // m if self.spec.p.pinw else n_next
        fresh = (upto - self.n_blocks) * m
        if fresh:
            parts.append(block_lse(q, tail_k[:, :, :fresh], self.tail_valid[:, :fresh], m, scaling, softcap))
        lse = torch.cat(parts, -1)  # [b, h, upto]
        p = self.spec.p
        if p.pin:
            top = lse.topk(min(p.pin, n_next), dim=-1)  # as many pins as blocks out of the window (the slots)
            self._grow_pins(n_next)
            self.pinned.zero_()
            self.pin_ok.zero_()
            self.pinned[..., : top.indices.shape[-1]] = top.indices
            self.pin_ok[..., : top.indices.shape[-1]] = torch.isfinite(top.values)
        if p.hold:  # the first decode step holds the next best blocks out of the window (pins and spans aside)
            rest = torch.cat([lse[..., :n_next], lse.new_zeros(*lse.shape[:-1], 1)], -1)
            if p.pin:
                for o in range(p.span):
                    rest.scatter_(-1, torch.where(self.pin_ok, (self.pinned + o).clamp_max(n_next), n_next), float("-inf"))
            self._grow_held(n_next)
            held = rest[..., :n_next].topk(min(self.held.shape[-1], n_next), dim=-1)
            self.held[..., : held.indices.shape[-1]] = held.indices
            self.held_ok[..., : held.indices.shape[-1]] = torch.isfinite(held.values)

    def _prefill(self, query, p0, n_next, scaling, softcap, sinks, tail) -> torch.Tensor:
        b, hq, q, d = query.shape
        p = self.spec.p
        select = p.prefill == "select" and n_next > 0
        if not select and softcap is None and not self.has_padding and self.n_blocks == 0 and p0 == 0:
            # the prompt may lie wholly in the sinks (sinks >= its tokens: no tail yet) or wholly in the tail
            kk = torch.cat([x for x in (sinks[0], tail[0]) if x is not None], 2)
            vv = torch.cat([x for x in (sinks[1], tail[1]) if x is not None], 2)
            return F.scaled_dot_product_attention(query, kk, vv, is_causal=True, scale=scaling, enable_gqa=True)
        summ = self._summaries(n_next, tail[0]) if select else None
        out = query.new_empty(b, hq, q, d)
        for a in range(0, q, _Q_CHUNK):
            e = min(q, a + _Q_CHUNK)
            cols = torch.arange(p0 + a, p0 + e, device=query.device)
            sel = self._prefill_selection(query[:, :, a:e], cols, summ) if select else None
            out[:, :, a:e] = self._prefill_chunk(query[:, :, a:e], cols, sel, sinks, tail, scaling, softcap)
        return out

    def _prefill_selection(self, q: torch.Tensor, cols: torch.Tensor, summ: torch.Tensor) -> torch.Tensor:
        """Blocks each query selects under the decode rule: ``[b, h, s, nb]`` bool."""
        p, nb = self.spec.p, summ.shape[2]
        fresh = self.tail_valid[:, : (nb - self.n_blocks) * self.m].reshape(self.batch, -1, self.m).any(-1)
        j = torch.arange(nb, device=q.device)
        vis = (j[None, :] < self.n_out_cols(cols)[:, None])[None, None] & torch.cat([self.blk_valid, fresh], 1)[:, None, None]
        scores = score_blocks(p.summary, q, summ, p.gqa)
        idx, ok = select_blocks(scores, vis, p.k or nb, p.nbr)
        return torch.zeros(scores.shape, dtype=torch.bool, device=q.device).scatter_(-1, idx, ok)

    def _visible(self, c: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor | None,
                 sel: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Mask ``[b|1, h|1, s, n]`` of token columns ``c`` for queries at columns ``cols``."""
        vis = (c[None, :] <= cols[:, None])[None, None]
        if sel is not None:
            j = torch.div(c - self.spec.sinks, self.m, rounding_mode="floor")
            in_blocks = (c[None, :] >= self.spec.sinks) & (j[None, :] < self.n_out_cols(cols)[:, None])
            vis = torch.where(in_blocks[None, None], sel[..., j.clamp(0, sel.shape[-1] - 1)], vis)
        return vis if valid is None else vis & valid[:, None, None, :]

    def _prefill_chunk(self, q, cols, sel, sinks, tail, scaling, softcap) -> torch.Tensor:
        dev, S = q.device, self.spec.sinks
        parts = []
        if sinks[0] is not None:
            c = torch.arange(sinks[0].shape[2], device=dev)
            parts.append(attend_segment(q, *sinks, self._visible(c, cols, self.sink_valid, None), scaling, softcap))
        n_cold = self.n_blocks * self.m
        for a in range(0, n_cold, _K_CHUNK):
            e = min(n_cold, a + _K_CHUNK)
            valid = None if self.cold_valid is None else self.cold_valid[:, a:e]
            mask = self._visible(torch.arange(S + a, S + e, device=dev), cols, valid, sel)
            parts.append(attend_segment(q, self.cold_k.read(a, e), self.cold_v.read(a, e), mask, scaling, softcap))
        t1, start = int(cols[-1]) + 1, S + n_cold
        for a in range(start, t1, _K_CHUNK):
            e = min(t1, a + _K_CHUNK)
            i, j = a - start, e - start
            mask = self._visible(torch.arange(a, e, device=dev), cols, self.tail_valid[:, i:j], sel)
            parts.append(attend_segment(q, tail[0][:, :, i:j], tail[1][:, :, i:j], mask, scaling, softcap))
        return merge(parts).to(q.dtype)

