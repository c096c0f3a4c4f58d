"""Forking a prefilled cache: one context, several continuations (``cache.fork()`` / ``kvslim.fork_cache``).

A fork is a second cache that holds what the first holds now and then goes its own way: prefill a document once,
fork it, and ask each fork a different question (what a server with prefix caching does), or keep one conversation
and branch it. Forks never affect each other or the cache they came from.

What is copied and what is shared
---------------------------------
* The **hot** tier (everything ``nbytes()`` counts: sinks, window, summaries, scores, pins) is copied (a deep copy):
  it is small for a compressing recipe, and some methods update it in place.
* A tiered method's **cold** tier (``recall``) is **shared**, not copied: its rows are the bulk of the bytes and a
  fork only ever appends rows after them. At a fork, every cold stream of every layer is *frozen*: both the parent
  and the new cache stop writing to it and read it through a :class:`SharedColdStream`, which holds the frozen
  streams as read-only parts (rows ``0 .. n``) followed by a fresh stream of its own (in a new cold tier of that
  cache), where its later rows go. Nothing needs copy-on-write because nothing writes a frozen row:

  - a :class:`~kvslim.cache.methods.recall.cold.ColdStream` changes its rows only through ``append`` (after the rows it holds),
    ``select_batch`` and ``close``; after the fork no cache holds a frozen stream as its own (the parent's layers are
    rewired to a wrapper too), and a wrapper calls none of the three on a part: ``append`` goes to its own stream,
    ``select_batch`` (batch reordering, e.g. beam search) first copies every row into a private stream, and
    ``close`` closes only its own stream;
  - a frozen stream lives as long as a cache reads it: each wrapper counts as a reader, and the last reader's
    ``close()`` (``cache.close()``) releases it, with its cold tier's files and temporary folder once none of that
    tier's streams is read any more; a cache dropped without ``close()`` releases it at garbage collection (the
    cold tier's finalizers).

  Forking a fork freezes the fork's own stream in turn, so a family of forks is a tree of frozen parts.

Bytes
-----
Each frozen part is counted by exactly one cache: the one whose stream it was before the fork (the parent); a fork
counts only the rows it appended itself. ``tier_nbytes()["cold"]`` of each cache follows that rule, so summing
``tier_nbytes()`` over a parent and its forks counts every shared cold byte once. ``tier_nbytes()["cold_shared"]``
(added by :meth:`KvslimCache.tier_nbytes <kvslim.cache.build.KvslimCache.tier_nbytes>` when non-zero) is what a
cache reads but another cache counts. :func:`family_nbytes` counts a set of caches by identity of the streams they
read, which stays right when the parent was dropped.

The hot bytes of a fork are its own (copied), so they are counted in every cache.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .methods.recall.cold import ColdStream, ColdTier

__all__ = ["SharedColdStream", "fork_cache", "family_nbytes", "cold_streams", "release_shared"]


class SharedColdStream:
    """The cold rows of one layer and role after a fork: read-only frozen ``parts`` (``(stream, rows, counted)``:
    rows ``0 .. rows`` of ``stream``, counted in this cache's bytes when ``counted``), then the rows of ``own``.

    It offers what :class:`~kvslim.cache.methods.recall.RecallLayer` uses of a
    :class:`~kvslim.cache.methods.recall.cold.ColdStream`: ``append``, ``fetch``, ``read``, ``select_batch``, ``nbytes``,
    ``fetched_bytes`` / ``read_bytes`` counters, ``n`` and ``close``. Row indices are global (part after part).
    """

    def __init__(self, parts: list[tuple[ColdStream, int, bool]], own: ColdStream) -> None:
        self.parts = [(s, int(n), bool(c)) for s, n, c in parts if n > 0]
        for s, _n, _c in self.parts:  # readers of each frozen stream: the last one to close releases it
            s.__dict__["fork_readers"] = s.__dict__.get("fork_readers", 0) + 1
        self.own = own
        self.fetched_bytes = 0
        self.read_bytes = 0
        self.closed = False

    # ---- what the layer reads --------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return sum(n for _s, n, _c in self.parts) + self.own.n

    @property
    def name(self) -> str:
        return self.own.name

    @property
    def path(self) -> Any:
        return self.own.path

    def _segments(self) -> list[tuple[ColdStream, int, int]]:
        """``(stream, first global row, rows)`` of every part and of ``own``."""
        out, at = [], 0
        for s, n, _c in self.parts:
            out.append((s, at, n))
            at += n
        out.append((self.own, at, self.own.n))
        return out

    def append(self, x: torch.Tensor) -> None:
        """Store ``x [b, h, n, d]`` after every row (in this cache's own stream)."""
        self.own.append(x)

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        """Decode rows ``idx [b, h, k]`` (global indices) -> ``[b, h, k, d]``; each part decodes its own rows."""
        out: torch.Tensor | None = None
        for s, lo, n in self._segments():
            inside = (idx >= lo) & (idx < lo + n)
            if n == 0 or not bool(inside.any()):
                continue
            before = s.fetched_bytes
            rows = s.fetch((idx - lo).clamp(0, n - 1))
            s.fetched_bytes = before  # the stream counted every index asked; count the rows that were wanted
            self.fetched_bytes += int(inside.sum()) * s.row_bytes
            out = rows if out is None else torch.where(inside[..., None], rows, out)
        if out is None:
            raise IndexError(f"cold stream {self.name}: nothing to fetch ({self.n} rows held)")
        return out

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Decode every row of tokens ``[start, stop)`` (global) -> ``[b, h, stop-start, d]``."""
        pieces = []
        for s, lo, n in self._segments():
            a, e = max(start, lo), min(stop, lo + n)
            if a < e:
                before = s.read_bytes
                pieces.append(s.read(a - lo, e - lo))
                s.read_bytes = before
                self.read_bytes += (e - a) * s.bh[0] * s.bh[1] * s.row_bytes
        if not pieces:
            raise IndexError(f"cold stream {self.name}: bad token range [{start}, {stop}) of {self.n}")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def select_batch(self, fn: Any) -> None:
        """Reorder the batch: every row is copied into a private stream first (the frozen parts stay as they are)."""
        if self.n == 0:
            return
        x = fn(self.read(0, self.n))
        self.read_bytes = 0
        old = self.own
        self.own = old.tier.stream(old.name, old.codec, old.out_dtype, old.device)
        old.tier.streams.remove(old)
        old.close()
        self._release_parts()
        self.own.append(x)

    # ---- bytes -----------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Cold bytes this cache counts: its own rows and the frozen parts it counts (see the module docstring)."""
        return self.own.nbytes() + sum(_rows_nbytes(s, n) for s, n, c in self.parts if c)

    def shared_nbytes(self) -> int:
        """Cold bytes this cache reads but another cache counts."""
        return sum(_rows_nbytes(s, n) for s, n, c in self.parts if not c)

    def reserved_nbytes(self) -> int:
        return self.own.reserved_nbytes()

    def close(self) -> None:
        """Release this cache's own rows, and each frozen part this cache is the last to read (its cold tier, files
        and temporary folder too once none of that tier's streams is read any more). Closing twice is harmless."""
        self.own.close()
        if not self.closed:
            self.closed = True
            self._release_parts()

    def _release_parts(self) -> None:
        for s, _n, _c in self.parts:
            s.fork_readers -= 1
            if s.fork_readers == 0:
                s.close()
                tier = s.tier
                if all(t.closed or not t.__dict__.get("fork_readers") for t in tier.streams):  # none read any more
                    tier.close()
        self.parts = []

    def __deepcopy__(self, memo: dict) -> SharedColdStream:
        """A deep copy shares the frozen parts (never written), uncounted, and copies the own rows."""
        new = SharedColdStream([(s, n, False) for s, n, _c in self.parts], copy.deepcopy(self.own, memo))
        new.fetched_bytes, new.read_bytes = self.fetched_bytes, self.read_bytes
        memo[id(self)] = new
        return new


def _rows_nbytes(s: ColdStream, n: int) -> int:
    return n * s.bh[0] * s.bh[1] * s.row_bytes


def _frozen(stream: Any) -> list[tuple[ColdStream, int, bool]]:
    """The parts a stream becomes when frozen (the parent keeps its counting)."""
    if isinstance(stream, SharedColdStream):
        return [*stream.parts, (stream.own, stream.own.n, True)]
    return [(stream, stream.n, True)]


def _tiered_layers(cache: Any) -> list[Any]:
    return [layer for layer in getattr(cache, "layers", []) if getattr(layer, "is_initialized", False)
            and hasattr(layer, "cold_k") and "tier" in getattr(getattr(layer, "ctx", None), "extras", {})]  # fmt: skip


def fork_cache(cache: Any) -> Any:
    """A copy of ``cache`` that continues on its own (see the module docstring): hot tier copied, cold tier shared.

    Any transformers ``Cache`` can be forked (one without kvslim's cold tier is deep-copied). The fork and the
    original give, from here on, exactly what two caches prefilled alike would give.
    """
    layers = _tiered_layers(cache)
    if not layers:
        return copy.deepcopy(cache)
    memo: dict[int, Any] = {}
    tiers: dict[int, tuple[ColdTier, ColdTier]] = {}  # id(the cache's current tier) -> (parent's new, fork's)
    old_tiers: dict[int, ColdTier] = {}
    for layer in layers:
        old_tier: ColdTier = layer.ctx.extras["tier"]
        if id(old_tier) not in tiers:
            user = old_tier.folder if old_tier._finalizer is None else None
            tiers[id(old_tier)] = (ColdTier(old_tier.store, user), ColdTier(old_tier.store, user))
        parent_tier, child_tier = tiers[id(old_tier)]
        for role in ("cold_k", "cold_v"):
            s = getattr(layer, role)
            base = s.own if isinstance(s, SharedColdStream) else s
            parts = _frozen(s)
            mine = SharedColdStream(parts, parent_tier.stream(base.name, base.codec, base.out_dtype, base.device))
            theirs = SharedColdStream([(p, n, False) for p, n, _c in parts],
                                      child_tier.stream(base.name, base.codec, base.out_dtype, base.device))
            if isinstance(s, SharedColdStream):  # the new wrappers read its parts now
                s._release_parts()
            setattr(layer, role, mine)
            memo[id(mine)] = theirs
        old_tiers[id(old_tier)] = old_tier
        layer.ctx.extras["tier"] = parent_tier
    for t in old_tiers.values():  # a tier whose streams hold no rows is read by nobody: release it now
        if all(not st.__dict__.get("fork_readers") for st in t.streams):
            t.close()
    for parent_tier, child_tier in tiers.values():
        memo[id(parent_tier)] = child_tier
    return copy.deepcopy(cache, memo)


def release_shared(cache: Any) -> None:
    """Close every :class:`SharedColdStream` of ``cache`` (its own rows, and the frozen parts it is the last to
    read): :meth:`KvslimCache.close <kvslim.cache.build.KvslimCache.close>` calls it."""
    for layer in getattr(cache, "layers", []):
        for role in ("cold_k", "cold_v"):
            s = getattr(layer, role, None)
            if isinstance(s, SharedColdStream):
                s.close()


def cold_streams(cache: Any) -> list[tuple[ColdStream, int]]:
    """``(stream, rows read)`` of every cold stream (frozen parts included) ``cache`` reads."""
    out = []
    for layer in _tiered_layers(cache):
        for role in ("cold_k", "cold_v"):
            s = getattr(layer, role)
            if isinstance(s, SharedColdStream):
                out += [(p, n) for p, n, _c in s.parts] + [(s.own, s.own.n)]
            else:
                out.append((s, s.n))
    return out


def family_nbytes(caches: list[Any]) -> dict[str, int]:
    """``{"hot", "cold"}`` bytes held by a set of caches (a parent and its forks, in any order, with or without the
    parent): hot summed (each cache holds its own), cold counted once per stored row, whoever reads it."""
    from ..memory import cache_nbytes

    rows: dict[int, tuple[ColdStream, int]] = {}
    for c in caches:
        for s, n in cold_streams(c):
            if n > rows.get(id(s), (s, 0))[1]:
                rows[id(s)] = (s, n)
    return {"hot": sum(cache_nbytes(c) for c in caches), "cold": sum(_rows_nbytes(s, n) for s, n in rows.values())}
