"""``knorm``: key-norm eviction (Devoto et al. 2024, arXiv:2406.11430): keep the keys of LOW L2 norm.

Low-norm keys draw high attention, so at the end of the prefill each KV head keeps the ``ceil(keep * n)`` tokens
whose keys have the smallest norm (or a fixed ``budget``); later tokens are appended. No attention scores are
needed. RoPE is a rotation, so post-RoPE keys have the norms of the pre-RoPE ones. The paper leaves the first two
layers uncompressed: ``knorm:keep=0.5,full_first=2``. Layer: :class:`~kvslim.cache.methods.evict.layer.EvictLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...method import register
from .layer import EvictMethod, EvictParams, Policy, budget_param, keep_param
from .scores import key_norm_scores

__all__ = ["KeyNorm", "KeyNormParams", "LowKeyNorm"]


@dataclass(frozen=True)
class LowKeyNorm(Policy):
    def scores(self, q, k, held, scaling, softcap, acc):
        return key_norm_scores(k)


@dataclass(frozen=True)
class KeyNormParams(EvictParams):
    keep: float = keep_param()
    budget: int = budget_param()


@register
class KeyNorm(EvictMethod):
    name = "knorm"
    summary = "key-norm: keep the tokens whose keys have the lowest L2 norm (after the prefill)"
    Params = KeyNormParams
    policy_class = LowKeyNorm
    examples = ({"keep": 0.5}, {"keep": 0.125})
