"""The shared cache layer every compression method builds on: sinks + exact tail through codec stores.

Interface (what a method file overrides; everything else is shared)
-------------------------------------------------------------------
A method's layer class subclasses :class:`BaseLayer` and its spec subclasses :class:`LayerSpec`. The base owns the
transformers cache-layer protocol (``update`` records the new post-RoPE K/V, ``get_seq_length`` counts tokens *seen*,
``get_mask_sizes`` reports ``(stored + q, seen - stored)``, batch reordering), padding (``has_padding``, per-token
validity), positions (``tail_pos`` when ``needs_positions``), the codec stores (``Store``: sinks exact, the tail
through the spec's tail codec), byte accounting and the attention template. Hooks, in the order one forward call
runs them (:meth:`BaseLayer.attend`, the template: no family replaces it):

* ``init_state()`` - allocate method state after the shapes are known (first ``update``).
* ``encode(k, v, pos)`` / ``decode_tail()`` - how exact tokens are stored and read back (latent: low-rank).
* ``ingest(k, v, pos, valid)`` - store the new tokens (default: the first ``spec.sinks`` into the sinks, the rest
  appended to the tail).
* ``take_pending(query, positions, valid_new) -> p0`` - take the tokens ``update`` recorded and store them through
  ``ingest`` (eviction: staged, stored by ``finish`` once the policy has chosen).
* ``prepare(q, p0) -> View`` - decode what attention reads this call (blocks: pool what left the window first).
* ``attend_view(query, view, scaling, softcap)`` - the call's attention: by default stock causal sdpa where exact,
  else query chunks over ``segments`` through ``attend_segments`` (one explicit softmax over every segment). A
  family with its own kernel (recall's decode step and log-sum-exp prefill, eviction's one pass over held + new
  tokens) overrides this step, beside ``prepare`` and ``finish``, never ``attend`` itself.
* ``segments(view, chunk) -> list[Segment]`` - what a chunk of queries attends to: keys, values and a boolean mask
  ``[b, h|1, s, n]`` per segment (default: sinks, then the exact tail, under the column rule below). A method that
  keeps a different set of tokens per KV head builds its own segments with ``[b, h, s, n]`` masks; one that fetches
  tokens from elsewhere (a cold tier) returns them as a segment.
* ``observe(segment, probs)`` - attention probabilities ``[b, h, g*s, n]`` of a segment whose ``observe`` is set;
  requested by ``wants_probs`` (a class or instance flag). Explicit-softmax attention runs when it is set.
* ``finish(view)`` - after the call's attention: trim, evict or compress (the end of every forward call; a prefill
  call has ``view.q > 1``).
* ``stored_length()``, ``stores()``, ``side_tensors()``, ``extra_nbytes()`` - what the layer holds, for the mask sizes,
  batch reordering and ``nbytes()``; ``tier_nbytes()`` - ``{"hot", "cold", "fetched"}`` (hot = ``nbytes()``; a tiered
  method adds its cold tier and the bytes fetched by the last step).

Column rule of the default segments. Columns are token indices in the (possibly left-padded) input, 0 = first token
ever given. With ``S`` sinks, a window ``W`` and ``m`` tokens per unit leaving the window (1 for a plain window), the
query at column ``t`` sees sink columns ``c < S`` with ``c <= t`` and exact columns ``S + n(t)*m <= c <= t``, where
``n(t) = max(0, (t - W + 1 - S) // m)`` counts the units that left the window of ``t``; ``W = None`` is unbounded.
What a query sees depends only on its column, so one-shot, chunked and token-by-token prefill agree.
Index letters: b batch, h KV head, g query heads per KV head, s queries, n entries, d dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from .attend import grouped_attention
from .parts import Chunk, LayerContext, Segment, View, stream_nbytes
from .registry import register_output
from .rows import decode_attention, entries, is_rows, rows_attention
from .storage import Store, append_pair, exact_codec, make_storage_codec

__all__ = ["BaseLayer", "Chunk", "LayerContext", "LayerSpec", "Segment", "View", "grouped_attention", "stream_nbytes"]

_QUERY_CHUNK = 1024
_NO_SEQUENCE = 2**61  # more tokens than any sequence holds


@dataclass(frozen=True)
class LayerSpec:
    """What one cache layer does; methods subclass it with their own fields. ``window=None``: unbounded.

    ``sliding`` is the model's own local window (Gemma 3 local layers), kept exact as the model expects;
    ``window_codec`` the storage of the exact window when it differs from ``codec`` ("" = the same).
    """

    window: int | None = None
    sinks: int = 0
    codec: str = "none"
    window_codec: str = ""
    sliding: int | None = None
    label: str = "full"

    def tail_codec(self) -> str:
        """Codec of the exact tail: the window codec of a bounded layer, except that append-only formats (KIVI)
        cannot drop their oldest tokens, so a bounded window stays 16-bit."""
        from ..formats import REGISTRY

        if self.window is None:
            return self.codec
        fmt = REGISTRY.get(self.codec)
        wcodec = "fp16" if fmt is not None and fmt.append_only else self.window_codec
        return wcodec if wcodec and wcodec != self.codec else self.codec

    def layer_class(self) -> type[BaseLayer]:
        """The cache-layer class implementing this spec (method specs return their own)."""
        return BaseLayer

    def build(self, ctx: LayerContext) -> BaseLayer:
        return self.layer_class()(self, ctx)


class BaseLayer(CacheLayerMixin):
    """A transformers cache layer: sinks + an exact tail (full, window and the model's local layers as they are).

    Class attributes a method may set: ``needs_positions`` (keep ``tail_pos [b, n]`` int32), ``codes_tail`` (the
    layer's hooks accept the tail as :class:`~kvslim.cache.rows.Rows` read from the codes at a decode step: True
    for this class; a subclass opts in by setting it in its own body, since its hooks may index tensors),
    ``from_codes`` (an instance may set it False to attend over decoded vectors at every step: the reference the
    from-codes path is tested against), ``wants_probs`` (attention probabilities go to :meth:`observe`), ``m`` /
    ``overlap`` (tokens per unit leaving the window and
    extra earlier tokens a unit keeps, see the column rule), ``shares_context_prefill`` (a fresh layer's first call
    without padding or softcap outputs sdpa of the call's own inputs whatever its parameters, so it can take
    another such layer's recorded output instead of recomputing it: the class then has ``plain_first_call(valid_new,
    softcap)`` and ``absorb(query, positions, valid_new, scaling, softcap, out)``; :mod:`kvslim.eval.harness.share`).
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    needs_positions: ClassVar[bool] = False
    codes_tail: ClassVar[bool] = True
    shares_context_prefill: ClassVar[bool] = False
    from_codes: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # reading the tail from the codes is opt-in per class: a method's own hooks may index the view's tail as
        # tensors, so a subclass gets Rows only when it declares ``codes_tail = True`` itself
        cls.codes_tail = cls.__dict__.get("codes_tail", False)
    wants_probs: bool = False

    def __init__(self, spec: LayerSpec, ctx: LayerContext) -> None:
        super().__init__()
        self.spec = spec
        self.ctx = ctx
        self.codec_factory = ctx.codec
        self.inv_freq = ctx.inv_freq
        self.is_sliding = spec.sliding is not None
        self.m, self.overlap = self.unit(spec)
        self.reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.label})"

    # ---- transformers cache-layer protocol -------------------------------------------------------------------
    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.keys = self.values = None  # never held: stored data lives in the stores
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def vector_dim(self, head_dim: int) -> int:
        """Dimension of the stored vectors (latent: the rank)."""
        return head_dim

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dt, dev = key_states.dtype, key_states.device
        self.dtype, self.device, self.batch, self.heads, self.dim = dt, dev, b, h, d
        vec = self.vector_dim(d)
        # one codec per stream (keys, values): KIVI differs by role, fractional TurboQuant calibrates per stream
        self.ck, self.cv = self.codec_factory(vec, "key"), self.codec_factory(vec, "value")
        self.codecs = [self.ck] if self.cv is self.ck else [self.ck, self.cv]
        # sinks (a handful of attention-sink tokens, the outliers softmax leans on) stay exact in the model dtype
        exact = exact_codec(vec)
        self.sink_k, self.sink_v = Store(exact, dt), Store(exact, dt)
        tk, tv = self.ck, self.cv
        name = self.spec.tail_codec()
        if name != self.spec.codec:
            tk = tv = make_storage_codec(name, vec)
            self.codecs.append(tk)
        self.tail_k, self.tail_v = Store(tk, dt), Store(tv, dt)
        self.sink_valid = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        self.tail_valid = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        self.tail_pos = torch.zeros(b, 0, dtype=torch.int32, device=dev) if self.needs_positions else None
        self.tail_start = self.spec.sinks
        self.has_padding = False
        self.init_state()
        self.is_initialized = True

    def init_state(self) -> None:
        """Hook: allocate method state (shapes, dtype and device are set)."""

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
        """Tokens (or entries) attention can read: what ``get_mask_sizes`` reports as stored."""
        if not self.is_initialized:
            return 0
        return self.sink_k.n + self.tail_k.n

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
        for s in self.stores():
            s.select_batch(fn)
        for name in self.side_tensors():
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def offload(self) -> None:  # everything stays where it is
        return None

    def prefetch(self) -> None:
        return None

    # ---- what is held ----------------------------------------------------------------------------------------
    def stores(self) -> list[Store]:
        """Every codec store the layer holds (subclasses add theirs)."""
        return [self.sink_k, self.sink_v, self.tail_k, self.tail_v]

    def side_tensors(self) -> list[str]:
        """Attribute names of per-batch-row side tensors (validity, positions, scores), batch axis first."""
        return ["sink_valid", "tail_valid", "tail_pos"]

    def extra_nbytes(self) -> int:
        """Bytes of method constants held per layer (latent bases)."""
        return 0

    def nbytes(self, include_codec_state: bool = True) -> int:
        """Bytes held: packed K/V of every store, the side tensors, method constants and (unless the cache counts
        shared codecs itself) the constants of this layer's codecs."""
        if not self.is_initialized:
            return 0
        total = sum(s.nbytes() for s in self.stores())
        for name in self.side_tensors():
            t = getattr(self, name)
            if t is not None:
                total += t.numel() * t.element_size()
        if include_codec_state:
            total += sum(int(c.state_nbytes()) for c in self.codecs)
        return total + self.extra_nbytes()

    def tier_nbytes(self) -> dict[str, int]:
        """Bytes per memory tier: ``hot`` (what every step reads: :meth:`nbytes`), ``cold`` (held elsewhere, read
        only when selected) and ``fetched`` (cold bytes moved by the last forward call). One-tier layers: 0, 0."""
        return {"hot": self.nbytes(), "cold": 0, "fetched": 0}

    # ---- prediction (the planner prices a layer with these; ``nbytes`` must equal ``predict(...)["stored"]``) -----
    @classmethod
    def counts(cls, spec: LayerSpec, n: int) -> dict[str, int]:
        """Vectors per stream after ``n`` tokens: ``sinks`` and exact ``tail`` (subclasses add theirs)."""
        m, overlap = cls.unit(spec)
        sinks = min(n, spec.sinks)
        n_out = 0 if spec.window is None else max(0, (n - spec.window + 1 - spec.sinks) // m)
        start = max(spec.sinks, spec.sinks + n_out * m - overlap)
        return {"sinks": sinks, "tail": max(0, n - start), "units": n_out}

    @classmethod
    def unit(cls, spec: LayerSpec) -> tuple[int, int]:
        """``(m, overlap)`` of the column rule for ``spec``."""
        return 1, 0

    @classmethod
    def predict(cls, spec: LayerSpec, n: int, shape: Any, batch: int = 1) -> dict[str, int]:
        """After ``n`` tokens of ``batch`` unpadded rows: ``stored`` (bytes ``nbytes(include_codec_state=False)``
        reports), ``read`` (KV bytes one decode step reads) and ``flops`` (attention-core FLOPs of one decode step,
        a multiply-add = 2). ``shape`` is a :class:`~kvslim.cache.method.ModelShape`."""
        c = cls.counts(spec, n)
        vec = cls.stored_dim(spec, shape)
        kv = stream_nbytes(shape, "none", vec, c["sinks"], batch) + stream_nbytes(shape, spec.tail_codec(), vec,
                                                                                   c["tail"], batch)  # fmt: skip
        side = batch * (c["sinks"] + c["tail"]) + (4 * batch * c["tail"] if cls.needs_positions else 0)
        attended = c["sinks"] + c["tail"]
        return {"stored": kv + side, "read": kv, "flops": 4 * batch * shape.heads * shape.head_dim * attended}

    @classmethod
    def stored_dim(cls, spec: LayerSpec, shape: Any) -> int:
        return shape.head_dim

    # ---- the column rule -------------------------------------------------------------------------------------
    def n_out(self, t: int) -> int:
        """Units that have completely left the window of the query at column ``t``."""
        w = self.spec.window
        if w is None:
            return 0
        return max(0, (t - w + 1 - self.spec.sinks) // self.m)

    def n_out_cols(self, t: torch.Tensor) -> torch.Tensor:
        w = self.spec.window
        if w is None:
            return torch.zeros_like(t)
        # in int64 tensors: a window or sink count beyond any sequence (both up to 2^63 - 1) is cut to 2^61, which
        # changes nothing a column can reach and keeps t - w + 1 - sinks from wrapping around (it hid every token)
        w, sinks = min(w, _NO_SEQUENCE), min(self.spec.sinks, _NO_SEQUENCE)
        return torch.div(t - w + 1 - sinks, self.m, rounding_mode="floor").clamp_min(0)

    # ---- storing ---------------------------------------------------------------------------------------------
    def encode(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: exact tokens ``[b, h, n, d]`` -> what the stores hold (default: themselves)."""
        return k, v

    def decode_tail(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Hook: the exact tail as ``[b, h, n, d]`` keys and values (None when empty)."""
        return self.tail_k.decode(), self.tail_v.decode()

    def ingest(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        """Store new tokens ``[b, h, q, d]`` at positions ``pos [b, q]`` with validity ``valid [b, q]``."""
        p0 = self.seen - k.shape[2]
        self.has_padding = self.has_padding or not bool(valid.all())
        ns = max(0, min(self.spec.sinks - p0, k.shape[2]))
        if ns:
            ks, vs = self.encode(k[:, :, :ns], v[:, :, :ns], pos[:, :ns])
            self.sink_k.append(ks)
            self.sink_v.append(vs)
            self.sink_valid = torch.cat([self.sink_valid, valid[:, :ns]], 1)
        kt, vt = self.encode(k[:, :, ns:], v[:, :, ns:], pos[:, ns:])
        append_pair(self.tail_k, self.tail_v, kt, vt)
        self.tail_valid = torch.cat([self.tail_valid, valid[:, ns:]], 1)
        if self.tail_pos is not None:
            self.tail_pos = torch.cat([self.tail_pos, pos[:, ns:].to(torch.int32)], 1)

    def trim(self, n_next: int) -> int:
        """Drop tail tokens no future query sees (before ``S + n_next*m - overlap``); returns how many."""
        start = self.spec.sinks + n_next * self.m - self.overlap
        drop = max(0, start - self.tail_start)
        if drop:
            self.tail_k.drop_front(drop)
            self.tail_v.drop_front(drop)
            self.tail_valid = self.tail_valid[:, drop:]
            if self.tail_pos is not None:
                self.tail_pos = self.tail_pos[:, drop:]
            self.tail_start += drop
        return drop

    # ---- attention -------------------------------------------------------------------------------------------
    def reads_codes(self, q: int, *stores: Store) -> bool:
        """True when this call's attention reads ``stores`` from their codes: a decode step (``q == 1``) through
        codecs whose capability flag ``attends_from_codes`` is set (unless the instance sets ``from_codes`` False)."""
        return q == 1 and self.from_codes and all(s.attends_from_codes() for s in stores)

    def read_tail(self, q: int) -> tuple[Any, Any]:
        """The tail this call attends to: at a decode step (``q == 1``) through codecs that attend from their codes,
        :class:`~kvslim.cache.rows.Rows` read from the codes; otherwise the decoded ``[b, h, n, d]`` tensors."""
        if self.reads_codes(q, self.tail_k, self.tail_v) and self.codes_tail:
            return self.tail_k.rows(), self.tail_v.rows()
        return self.decode_tail()

    def prepare(self, q: int, p0: int) -> View:
        """Hook: decode (or, at a decode step, read from the codes) what this call's attention reads."""
        tail_k, tail_v = self.read_tail(q)
        return View(q, p0, self.sink_k.decode(), self.sink_v.decode(), tail_k, tail_v)

    def plain_causal(self, view: View) -> bool:
        """A fresh unpadded prefill of an unbounded layer: stock causal sdpa over the new tokens is exact."""
        return (
            view.p0 == 0 and view.q > 1 and self.spec.window is None and self.spec.sinks == 0 and not self.has_padding
            and not self.wants_probs and self.tail_k.n == view.q
        )

    def query_chunk(self) -> int:
        """Queries per attention call: a chunk sees about ``chunk + W + m`` exact tokens, so windowed layers use
        chunks near their window (less work per query), unbounded layers 1024."""
        if self.spec.window is None:
            return _QUERY_CHUNK
        return max(256, min(_QUERY_CHUNK, self.spec.window + self.m + self.overlap))

    def sink_segment(self, view: View, chunk: Chunk) -> Segment | None:
        if view.sink_k is None:
            return None
        if self.decode_mask_free(chunk.q.shape[2]):
            return Segment(view.sink_k, view.sink_v, None, name="sinks")
        cols = torch.arange(view.sink_k.shape[2], device=chunk.q.device)
        vis = (cols[None, :] <= chunk.cols[:, None])[None] & self.sink_valid[:, None, :]  # [b, s, ns]
        return Segment(view.sink_k, view.sink_v, vis[:, None], name="sinks")

    def tail_segment(self, view: View, chunk: Chunk) -> Segment | None:
        if view.tail_k is None:
            return None
        t1 = int(chunk.cols[-1])
        lo = max(self.spec.sinks + int(chunk.n_out[0]) * self.m, self.tail_start)
        a, e = lo - self.tail_start, t1 + 1 - self.tail_start
        if e <= a:
            return None
        if self.decode_mask_free(chunk.q.shape[2]):
            return Segment(entries(view.tail_k, a, e), entries(view.tail_v, a, e), None, name="tail",
                           observe=self.wants_probs, meta=(a, e))  # fmt: skip
        cols = torch.arange(lo, t1 + 1, device=chunk.q.device)
        first = self.spec.sinks + chunk.n_out * self.m
        vis = (cols[None, :] >= first[:, None]) & (cols[None, :] <= chunk.cols[:, None])
        vis = vis[None] & self.tail_valid[:, None, a:e]
        return Segment(entries(view.tail_k, a, e), entries(view.tail_v, a, e), vis[:, None], name="tail",
                       observe=self.wants_probs, meta=(a, e))  # fmt: skip

    def segments(self, view: View, chunk: Chunk) -> list[Segment]:
        """Hook: what ``chunk`` attends to (default: sinks, then the exact tail)."""
        return [s for s in (self.sink_segment(view, chunk), self.tail_segment(view, chunk)) if s is not None]

    def observe(self, segment: Segment, probs: torch.Tensor) -> None:
        """Hook: attention probabilities ``[b, h, g*s, n]`` over ``segment`` (when ``segment.observe``)."""

    def decode_mask_free(self, s: int) -> bool:
        """True when one query without padding sees everything its segments hold (no mask needed)."""
        return s == 1 and not self.has_padding

    def attend_segments(self, chunk: Chunk, segs: list[Segment], scaling: float, softcap: float | None) -> torch.Tensor:
        q = chunk.q
        b, _, s, _ = q.shape
        if self.decode_mask_free(s):
            mask = None  # one query, no padding: everything assembled is visible by construction
        else:
            heads = max(1 if g.mask is None else g.mask.shape[1] for g in segs)
            mask = torch.cat([
                g.mask.expand(b, heads, s, g.k.shape[2]) if g.mask is not None
                else torch.ones(b, heads, s, g.k.shape[2], dtype=torch.bool, device=q.device)
                for g in segs
            ], dim=-1)  # fmt: skip
        want = self.wants_probs or any(g.observe for g in segs)
        if mask is None and not want and any(is_rows(g.k) or is_rows(g.v) for g in segs):
            return decode_attention(q, [g.k for g in segs], [g.v for g in segs], scaling, softcap)
        if any(is_rows(g.k) or is_rows(g.v) for g in segs):  # read from the codes: explicit softmax over segments
            out, probs, _ = rows_attention(q, [g.k for g in segs], [g.v for g in segs], mask, scaling, softcap,
                                           may_be_empty=self.has_padding)  # fmt: skip
        else:
            k = segs[0].k if len(segs) == 1 else torch.cat([g.k for g in segs], dim=2)
            v = segs[0].v if len(segs) == 1 else torch.cat([g.v for g in segs], dim=2)
            out, probs = grouped_attention(q, k, v, mask, scaling, softcap, want_probs=want,
                                           may_be_empty=self.has_padding)  # fmt: skip
        if want:
            off = 0
            for g in segs:
                if g.observe:
                    self.observe(g, probs[..., off : off + g.k.shape[2]])
                off += g.k.shape[2]
        return out

    def finish(self, view: View) -> None:
        """Hook: after the call's attention (default: drop what left every future window)."""
        self.trim(self.n_out(self.seen))

    def take_pending(self, query: torch.Tensor, positions: torch.Tensor | None, valid_new: torch.Tensor | None) -> int:
        """Store the tokens ``update`` recorded (through :meth:`ingest`) for the queries ``[b, h*g, q, d]`` of this
        call: positions default to the columns after what was seen, validity to all True. Returns the first column."""
        k_new, v_new = self.pending
        self.pending = None
        b, q = query.shape[0], query.shape[2]
        p0 = self.seen - q
        if positions is None:
            positions = torch.arange(p0, p0 + q, device=query.device)[None]
        if valid_new is None:
            valid_new = torch.ones(b, q, dtype=torch.bool, device=query.device)
        self.ingest(k_new, v_new, positions.expand(b, q), valid_new)
        return p0

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor | None, valid_new: torch.Tensor | None,
        scaling: float, softcap: float | None,
    ) -> torch.Tensor:
        """The template every layer runs: ``query [b, h*g, q, d]``, ``positions [b|1, q]`` (RoPE positions of the new
        tokens), ``valid_new [b, q]`` bool (False for padding) -> ``[b, q, h*g, d]``. Its steps are the hooks a
        family extends: :meth:`take_pending` stores the call's tokens (through :meth:`ingest`), :meth:`prepare`
        decodes what the call reads (a :class:`View`), :meth:`attend_view` attends over it (by default over the
        :meth:`segments` of each query chunk), :meth:`finish` trims, evicts or compresses."""
        p0 = self.take_pending(query, positions, valid_new)
        view = self.prepare(query.shape[2], p0)
        out = self.attend_view(query, view, scaling, softcap)
        self.finish(view)
        return out

    def attend_view(self, query: torch.Tensor, view: View, scaling: float, softcap: float | None) -> torch.Tensor:
        """Hook: the call's attention over ``view`` -> ``[b, q, h*g, d]``. Default: stock causal sdpa where it is exact
        (:meth:`plain_causal`), else query chunks (:meth:`query_chunk`), each over its :meth:`segments` through
        :meth:`attend_segments`."""
        b, hq, q, d = query.shape
        if softcap is None and self.plain_causal(view):
            out = F.scaled_dot_product_attention(
                query, view.tail_k, view.tail_v, is_causal=True, scale=scaling, enable_gqa=True
            )
            return out.transpose(1, 2)
        out = query.new_empty(b, q, hq, d)
        step = self.query_chunk()
        for a in range(0, q, step):
            e = min(q, a + step)
            cols = torch.arange(view.p0 + a, view.p0 + e, device=query.device)
            chunk = Chunk(query[:, :, a:e], cols, self.n_out_cols(cols))
            out[:, a:e] = self.attend_segments(chunk, self.segments(view, chunk), scaling, softcap)
        return out
