"""``heavy``: HCA-like compression (DeepSeek V4 report sec. 2.3.2): tokens leaving the window pooled m to 1, every
entry attended (no selection). The layer is :class:`~kvslim.cache.methods.blocks.BlocksLayer` with ``topk = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..method import Method, Params, param, register
from .blocks import BlockSpec, pool_param
from .window import sinks_param, window_param, wq_param

__all__ = ["Heavy", "HeavyParams"]


@dataclass(frozen=True)
class HeavyParams(Params):
    m: int = param(64, "tokens pooled into one entry", lo=1)
    w: int = window_param(128)
    sinks: int = sinks_param()
    pool: str = pool_param()
    wq: int = wq_param()


@register
class Heavy(Method):
    name = "heavy"
    summary = "HCA-like: tokens leaving the window pooled m:1, all entries attended"
    Params = HeavyParams
    needs_rope = True
    lossless = ({"m": 64, "w": 1024},)
    examples = ({"m": 8, "w": 8},)

    def global_spec(self, index: int) -> BlockSpec:
        p = self.params
        return BlockSpec(window=p.w, sinks=p.sinks, codec=self.codec, window_codec=self.window_codec(),
                         label=self.name, block=p.m, topk=0, overlap=0, pool=p.pool)  # fmt: skip
