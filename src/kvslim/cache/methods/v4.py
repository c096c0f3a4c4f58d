"""``v4``: DeepSeek-V4-like interleave (V4 report sec. 2.3): CSA and HCA layers alternate over the global layers.

Even compressed layers are CSA-like (``m`` tokens per entry with ``overlap`` earlier ones, ``k`` entries per query),
odd ones HCA-like (``hm`` tokens per entry, all attended); every compressed layer keeps ``sinks`` + a ``w``-token
exact window. Both are :class:`~kvslim.cache.methods.blocks.BlocksLayer` s.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..method import Method, Params, param, register
from .blocks import BlockSpec, pool_param
from .window import sinks_param, window_param, wq_param

__all__ = ["V4", "V4Params"]


@dataclass(frozen=True)
class V4Params(Params):
    m: int = param(4, "CSA layers: tokens pooled into one entry", lo=1)
    k: int = param(32, "CSA layers: blocks attended per query", lo=0)
    overlap: int = param(4, "CSA layers: extra earlier tokens pooled (V4 pools 8 at stride 4)", lo=0)
    hm: int = param(64, "HCA layers: tokens pooled into one entry", lo=1)
    w: int = window_param(128, "exact recent tokens (every compressed layer)")
    sinks: int = sinks_param()
    pool: str = pool_param()
    wq: int = wq_param()


@register
class V4(Method):
    name = "v4"
    summary = "DeepSeek-V4-like interleave: CSA and HCA layers alternate over the global layers"
    Params = V4Params
    needs_rope = True
    lossless = ({"w": 1024},)
    examples = ({"w": 8, "m": 2, "k": 3, "hm": 6},)

    def global_spec(self, index: int) -> BlockSpec:
        p = self.params
        csa = index % 2 == 0
        return BlockSpec(window=p.w, sinks=p.sinks, codec=self.codec, window_codec=self.window_codec(),
                         label="csa" if csa else "hca", block=p.m if csa else p.hm, topk=p.k if csa else 0,
                         overlap=p.overlap if csa else 0, pool=p.pool)  # fmt: skip
