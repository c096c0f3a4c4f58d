"""``full``: every token kept exactly (a ``DynamicCache`` equivalent); with a codec, every token through it.

The layer is the shared :class:`~kvslim.cache.base.BaseLayer` with no window and no sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import LayerSpec
from ..method import Method, Params, register

__all__ = ["Full", "FullParams"]


@dataclass(frozen=True)
class FullParams(Params):
    """No parameters (``full_first`` is common to every method)."""


@register
class Full(Method):
    name = "full"
    summary = "every token exact (DynamicCache equivalent)"
    Params = FullParams
    lossless = ({},)

    def global_spec(self, index: int) -> LayerSpec:
        return LayerSpec(codec=self.codec, label="full")
