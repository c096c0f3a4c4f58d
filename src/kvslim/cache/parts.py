"""The data types of the cache-layer interface (see :mod:`kvslim.cache.base`, which re-exports them).

``LayerSpec`` (what one layer does; methods subclass it), ``LayerContext`` (what the builder hands a layer), ``View``
(what one forward call's attention reads), ``Chunk`` (a chunk of queries), ``Segment`` (keys, values and a mask a
chunk attends to) and ``stream_nbytes`` (the predicted bytes of a pair of K/V stores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import BaseLayer

__all__ = ["Chunk", "LayerContext", "LayerSpec", "Segment", "View", "stream_nbytes"]


def stream_nbytes(shape: Any, codec: str, dim: int, count: int, batch: int = 1) -> int:
    """Bytes of ``count`` keys plus ``count`` values per KV head of ``shape`` in ``codec`` (``none``: the model's
    dtype), for ``batch`` rows: what a pair of :class:`~kvslim.cache.storage.Store` s holds."""
    from ..formats import vectors_nbytes

    fmt = shape.dtype if codec == "none" else codec
    rows = batch * shape.kv_heads
    return rows * sum(vectors_nbytes(fmt, dim, count, role) for role in ("key", "value"))


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
        from .base import BaseLayer

        return BaseLayer

    def build(self, ctx: LayerContext) -> BaseLayer:
        return self.layer_class()(self, ctx)


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
