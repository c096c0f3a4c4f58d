"""The data types of the cache-layer interface (see :mod:`kvslim.cache.base`, which re-exports them and holds
``LayerSpec``, what one layer does, beside the layer class it builds).

``LayerContext`` (what the builder hands a layer), ``View`` (what one forward call's attention reads), ``Chunk`` (a
chunk of queries), ``Segment`` (keys, values and a mask a chunk attends to) and ``stream_nbytes`` (the predicted
bytes of a pair of K/V stores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Chunk", "LayerContext", "Segment", "View", "stream_nbytes"]


def stream_nbytes(shape: Any, codec: str, dim: int, count: int, batch: int = 1) -> int:
    """Bytes of ``count`` keys plus ``count`` values per KV head of ``shape`` in ``codec`` (``none``: the model's
    dtype), for ``batch`` rows: what a pair of :class:`~kvslim.cache.storage.Store` s holds."""
    from ..formats import vectors_nbytes

    fmt = shape.dtype if codec == "none" else codec
    rows = batch * shape.kv_heads
    return rows * sum(vectors_nbytes(fmt, dim, count, role) for role in ("key", "value"))


@dataclass
class LayerContext:
    """What a layer gets from the cache builder: ``codec(dim, role)`` (shared codec instances), the layer index,
    the model's RoPE inverse frequencies ``[R/2]`` for this layer (None without RoPE) and method extras."""

    codec: Any
    index: int = 0
    inv_freq: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class View:
    """What one forward call's attention reads (decoded once per call). Methods subclass it for more fields."""

    q: int
    p0: int
    sink_k: torch.Tensor | None
    sink_v: torch.Tensor | None
    tail_k: torch.Tensor | None
    tail_v: torch.Tensor | None


@dataclass
class Chunk:
    """A chunk of queries: ``q [b, hq, s, d]`` at columns ``cols [s]``; ``n_out [s]`` units out of their windows."""

    q: torch.Tensor
    cols: torch.Tensor
    n_out: torch.Tensor


@dataclass
class Segment:
    """Keys/values ``[b, h, n, d]`` a chunk attends to and ``mask [b, h|1, s, n]`` (True = attend; None = all).
    ``observe``: hand its attention probabilities to ``observe``; ``meta``: anything the method needs there."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    name: str = ""
    observe: bool = False
    meta: Any = None
