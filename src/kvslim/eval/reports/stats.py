"""Small statistics for the evaluation: Wilson intervals for accuracies and an exact paired test for two recipes.

* :func:`wilson` is the 95 % Wilson score interval of a proportion (Wilson 1927); unlike the normal interval it
  stays inside [0, 1] and is not empty at 0/n or n/n. For partial-credit scores (a fraction of the answers found)
  it is applied to the mean score: a score in [0, 1] with mean p has variance at most p(1 - p), so the interval is
  at least as wide as the Bernoulli one would need.
* :func:`sign_test` is the exact two-sided McNemar test on discordant pairs (a binomial sign test): of the ``b + c``
  prompts where the two recipes disagree, ``b`` favour A and ``c`` favour B; under "no difference" ``b`` is
  Binomial(b + c, 1/2). ``p = min(1, 2 P(X <= min(b, c)))``.
* :func:`paired` pairs two recipes' cells on the prompts both have and runs the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Z95", "wilson", "fmt_ci", "sign_test", "Paired", "paired"]

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(lo, hi)`` of an observed proportion ``p`` (successes / n) over ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a proportion lies in [0, 1], got {p}")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if p == 0.0 else max(0.0, centre - half)  # exact ends: no rounding residue at 0/n and n/n
    hi = 1.0 if p == 1.0 else min(1.0, centre + half)
    return lo, hi


def fmt_ci(p: float, n: int) -> str:
    """``0.80 [0.49, 0.94] n=10``."""
    lo, hi = wilson(p, n)
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}] n={n}"


def sign_test(b: int, c: int) -> float:
    """Exact two-sided p-value of ``b`` vs ``c`` discordant pairs (McNemar's exact test); 1.0 when none."""
    if b < 0 or c < 0:
        raise ValueError("counts are non-negative")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """The paired comparison of recipes A and B on ``n`` shared prompts."""

    a: str
    b: str
    n: int  # prompts both have
    a_better: int  # discordant pairs where A scored higher
    b_better: int
    p: float
    mean_a: float
    mean_b: float

    @property
    def differ(self) -> bool:
        """Whether they differ beyond chance at the 5 % level."""
        return self.p < 0.05

    def sentence(self) -> str:
        verdict = ("differ beyond chance (p < 0.05)" if self.differ else "do not differ beyond chance (p >= 0.05)")
        return (f"{self.a} vs {self.b} on {self.n} shared prompts: mean {self.mean_a:.2f} vs {self.mean_b:.2f}; "
                f"{self.a} better on {self.a_better}, {self.b} better on {self.b_better}; exact sign test "
                f"p = {self.p:.3g}: they {verdict}")


def paired(a: str, b: str, cells_a: dict, cells_b: dict) -> Paired:
    """Compare ``{prompt key: score in [0, 1]}`` of two recipes on the keys both have (McNemar / sign test)."""
    shared = sorted(set(cells_a) & set(cells_b), key=repr)
    diffs = [cells_a[k] - cells_b[k] for k in shared]
    ab = sum(d > 0 for d in diffs)
    bb = sum(d < 0 for d in diffs)
    n = len(shared)
    mean_a = sum(cells_a[k] for k in shared) / n if n else float("nan")
    mean_b = sum(cells_b[k] for k in shared) / n if n else float("nan")
    return Paired(a, b, n, ab, bb, sign_test(ab, bb), mean_a, mean_b)
