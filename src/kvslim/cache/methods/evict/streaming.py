"""``streaming``: StreamingLLM (Xiao et al. 2023, arXiv:2309.17453) on a keep ratio: ``sinks`` first tokens + the
most recent ones, per layer and KV head.

The prompt is attended in full, then cut to ``ceil(keep * n)`` tokens: the ``sinks`` attention sinks and the most
recent rest; at every later call the oldest non-sink tokens are evicted back to ``ceil(keep * seen)`` (or a fixed
``budget``). The ``window`` recipe is the same policy with a fixed window applied during the prefill too (each
prompt query already sees only sinks + window, as in the paper's streaming setting); this one matches the field's
"compress after prefill" harnesses and takes a keep ratio. Layer: :class:`~kvslim.cache.methods.evict.layer.EvictLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...method import register
from ..window import sinks_param
from .layer import EvictMethod, EvictParams, Policy, budget_param, keep_param

__all__ = ["Streaming", "StreamingLLM", "StreamingParams"]


@dataclass(frozen=True)
class StreamingLLM(Policy):
    continuous = True

    def protect(self, budget: int) -> tuple[int, int]:
        return self.params.sinks, budget  # after the sinks, the whole budget goes to the most recent tokens

    def scores(self, q, k, held, scaling, softcap, acc):
        return torch.zeros(k.shape[:3], device=k.device)


@dataclass(frozen=True)
class StreamingParams(EvictParams):
    keep: float = keep_param()
    budget: int = budget_param()
    sinks: int = sinks_param()


@register
class Streaming(EvictMethod):
    name = "streaming"
    summary = "StreamingLLM on a keep ratio: sinks + the most recent tokens, evicted at every step"
    Params = StreamingParams
    policy_class = StreamingLLM
    examples = ({"keep": 0.5}, {"keep": 0.25, "sinks": 2})
