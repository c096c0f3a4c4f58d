"""``snapkv``: SnapKV (Li et al. 2024, arXiv:2404.14469, sec. 4): the prompt's observation window votes.

At the end of the prefill, the last ``window`` prompt queries' attention over the prompt is summed per token
(averaged over each KV head's query group), pooled along the tokens (``pool`` = max or avg, ``kernel`` wide) so a
kept token brings its neighbours, and each KV head keeps the window plus the best-voted tokens, ``ceil(keep * n)``
in all (or a fixed ``budget``). Later tokens are appended (the paper compresses the prompt once). Prefilled in one
call the window holds the question (question-aware, as in the paper); with the context prefilled alone it holds the
end of the context (question-agnostic). Layer: :class:`~kvslim.cache.methods.evict.layer.EvictLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ....errors import InvalidInput
from ...method import param, register
from .layer import EvictMethod, EvictParams, Policy, budget_param, keep_param
from .scores import POOLINGS, causal_probs, keep_budget, snapkv_scores

__all__ = ["SnapKV", "SnapKVParams", "SnapKVPolicy"]


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    def check_prompt(self, n: int) -> None:
        window = self.params.window
        if keep_budget(n, self.ratio, self.budget) < n and window > n:  # (nothing to evict: no votes needed)
            raise InvalidInput(f"snapkv: observation window {window} is longer than the {n}-token prompt; "
                               f"use window <= {n}")

    def protect(self, budget: int) -> tuple[int, int]:
        return 0, self.params.window

    def scores(self, q, k, held, scaling, softcap, acc):
        n, p = k.shape[2], self.params
        probs = causal_probs(q[:, :, -p.window :], k, scaling, softcap, first=n - p.window)
        return snapkv_scores(probs, p.kernel, p.pool)


@dataclass(frozen=True)
class SnapKVParams(EvictParams):
    keep: float = keep_param()
    budget: int = budget_param()
    window: int = param(32, "observation window: the last prompt tokens whose queries vote (kept)", lo=1)
    kernel: int = param(7, "pooling width along the tokens (odd: centred)", choices=(1, 3, 5, 7, 9, 11, 13, 15))
    pool: str = param("max", "pooling of the votes: max or avg", choices=POOLINGS)


@register
class SnapKV(EvictMethod):
    name = "snapkv"
    summary = "SnapKV: the prompt's last queries vote (pooled attention), the window + the top voted kept"
    Params = SnapKVParams
    policy_class = SnapKVPolicy
    examples = ({"keep": 0.5, "window": 1}, {"keep": 0.25, "window": 1, "pool": "avg", "kernel": 3})
