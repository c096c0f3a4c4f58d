"""``window``: StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): attention sinks + a window of recent tokens.

The first ``sinks`` tokens and the last ``w`` stay exact; a token leaving the window is dropped (evicted, not masked).
The layer is the shared :class:`~kvslim.cache.base.BaseLayer` (its column rule with ``m = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import LayerSpec
from ..method import Method, Params, param, register

__all__ = ["Window", "WindowParams", "sinks_param", "window_param", "wq_param"]

W_MESSAGE = "w (window) must be at least 1, got {value}"
WQ_MEANING = "1: the exact window is stored through the codec too (as V4 does); 0: kept 16-bit"


def window_param(default: int, meaning: str = "exact recent tokens") -> int:
    """The ``w`` field: exact recent tokens, at least 1."""
    return param(default, meaning, lo=1, message=W_MESSAGE)


def sinks_param(default: int = 4) -> int:
    return param(default, "exact first tokens", lo=0)


def wq_param() -> int:
    return param(0, WQ_MEANING, choices=(0, 1))


@dataclass(frozen=True)
class WindowParams(Params):
    w: int = window_param(256)
    sinks: int = sinks_param()
    wq: int = wq_param()


@register
class Window(Method):
    name = "window"
    summary = "StreamingLLM window + attention sinks; older tokens dropped"
    Params = WindowParams
    lossless = ({"w": 1024},)
    examples = ({"w": 8, "sinks": 2}, {"w": 5, "sinks": 0})

    def global_spec(self, index: int) -> LayerSpec:
        p = self.params
        return LayerSpec(window=p.w, sinks=p.sinks, codec=self.codec, window_codec=self.window_codec(), label="window")
