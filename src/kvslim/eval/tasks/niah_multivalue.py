"""RULER's multi-value retrieval (MV-NIAH, Hsieh et al. 2024, section 3.1): four values of one key, all asked for.

``niah_multivalue``: 4 needles with the same word key and different 7-digit numbers in natural prose; ``depth``
places the first, the others go to random depths. ``retrieved`` (and ``score``) is the fraction of the four numbers
in the answer; ``success`` needs all four. (The older ``multi-needle`` task spreads its values evenly from ``depth``
instead.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .needles import KeyedNeedles

__all__ = ["NiahMultivalue"]


@dataclass
class NiahMultivalue(KeyedNeedles):
    n_values: int = 4
    name = "niah_multivalue"
