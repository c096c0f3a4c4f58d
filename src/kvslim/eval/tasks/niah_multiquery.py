"""RULER's multi-query retrieval (MQ-NIAH, Hsieh et al. 2024, section 3.1): four keys, each with one value, all
asked for in one question.

``niah_multiquery``: 4 needles with different word keys in natural prose; ``depth`` places the first asked key's
needle, the others go to random depths. ``retrieved`` (and ``score``) is the fraction of the four values found.
"""

from __future__ import annotations

from dataclasses import dataclass

from .needles import KeyedNeedles

__all__ = ["NiahMultiquery"]


@dataclass
class NiahMultiquery(KeyedNeedles):
    n_keys: int = 4
    n_queries: int = 4
    name = "niah_multiquery"
