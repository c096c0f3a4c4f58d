"""``tova``: TOVA, Token Omission Via Attention (Oren et al. 2024, arXiv:2401.06104, sec. 3.3).

After every forward call the layer evicts, per KV head, the tokens the current (last) query attends to least, back
to ``ceil(keep * seen)`` tokens (or a fixed ``budget``): the cache is a bounded multi-state RNN. As in the paper the
scores are averaged over all heads of the layer (one token set for every head); ``per_head=1`` averages within each
KV head's query group instead. No sinks and no recent window: the paper has none. Layer:
:class:`~kvslim.cache.methods.evict.layer.EvictLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...method import param, register
from .layer import EvictMethod, EvictParams, Policy, budget_param, keep_param
from .scores import causal_probs, tova_scores

__all__ = ["TOVA", "Tova", "TovaParams"]


@dataclass(frozen=True)
class TOVA(Policy):
    continuous = True

    def scores(self, q, k, held, scaling, softcap, acc):
        probs = causal_probs(q[:, :, -1:], k, scaling, softcap, first=k.shape[2] - 1)
        return tova_scores(probs, per_head=bool(self.params.per_head))


@dataclass(frozen=True)
class TovaParams(EvictParams):
    keep: float = keep_param()
    budget: int = budget_param()
    per_head: int = param(0, "1: average the scores within each KV head's group; 0: over the layer (paper)",
                          choices=(0, 1))


@register
class Tova(EvictMethod):
    name = "tova"
    summary = "TOVA: evict the tokens the current query attends to least, at every step (per KV head)"
    Params = TovaParams
    policy_class = TOVA
    examples = ({"keep": 0.5}, {"keep": 0.25, "per_head": 1})
