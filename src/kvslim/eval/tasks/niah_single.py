"""RULER's single-needle retrieval (S-NIAH, Hsieh et al. 2024, section 3.1): one key, one value, at depth d.

Three registered variants, as RULER configures them (every option of :class:`~kvslim.eval.tasks.needles.KeyedNeedles`
can still be changed, e.g. ``values="words"`` or ``haystack="needles"``):

* ``niah_single_1``: the repeated passkey filler ("The grass is green. ..."), a word key, a 7-digit number;
* ``niah_single_2``: natural prose (Python's documentation), a word key, a 7-digit number;
* ``niah_single_3``: natural prose, a word key, a UUID-like value.
"""

from __future__ import annotations

from dataclasses import dataclass

from .needles import KeyedNeedles

__all__ = ["NiahSingle1", "NiahSingle2", "NiahSingle3"]


@dataclass
class NiahSingle1(KeyedNeedles):
    haystack: str = "noise"
    name = "niah_single_1"


@dataclass
class NiahSingle2(KeyedNeedles):
    haystack: str = "essay"
    name = "niah_single_2"


@dataclass
class NiahSingle3(KeyedNeedles):
    haystack: str = "essay"
    values: str = "uuids"
    name = "niah_single_3"
