"""``h2o``: H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv:2306.14048, sec. 3).

Every token's attention is accumulated over every query so far (summed over each KV head's query group); after
every forward call each KV head keeps the ``recent`` share of its budget as the most recent tokens and the rest as
the heaviest hitters, back to ``ceil(keep * seen)`` tokens (or a fixed ``budget``). The running scores (float32,
one per kept token and KV head) are held and counted in ``nbytes()``. Layer: :class:`~kvslim.cache.methods.evict.layer.EvictLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ....errors import InvalidInput
from ...method import param, register
from .layer import EvictMethod, EvictParams, Policy, budget_param, keep_param

__all__ = ["H2O", "H2OParams", "HeavyHitters"]


@dataclass(frozen=True)
class HeavyHitters(Policy):
    continuous = True
    accumulates = True

    def protect(self, budget: int) -> tuple[int, int]:
        return 0, round(self.params.recent * budget)

    def scores(self, q, k, held, scaling, softcap, acc):
        return acc


@dataclass(frozen=True)
class H2OParams(EvictParams):
    keep: float = keep_param()
    budget: int = budget_param()
    recent: float = param(0.5, "share of the budget kept as the most recent tokens, in [0, 1) (paper: half)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.recent, (int, float)) or not 0 <= self.recent < 1:
            raise InvalidInput(f"h2o: recent (share of the budget kept as recent tokens) must be in [0, 1), "
                               f"got {self.recent!r}")


@register
class H2O(EvictMethod):
    name = "h2o"
    summary = "H2O: accumulated attention (heavy hitters) + recent tokens, evicted at every step"
    Params = H2OParams
    policy_class = HeavyHitters
    examples = ({"keep": 0.5}, {"keep": 0.25, "recent": 0.25})
