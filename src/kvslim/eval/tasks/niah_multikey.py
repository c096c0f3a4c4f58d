"""RULER's multi-key retrieval (MK-NIAH, Hsieh et al. 2024, section 3.1): the asked key's needle among needles with
other keys (distractors); ``depth`` places the asked needle, the distractors go to random depths.

* ``niah_multikey_1``: 4 keys (1 asked + 3 distractors) in natural prose;
* ``niah_multikey_2``: a haystack made only of needles with other keys (RULER's "KV retrieval"-like variant);
* ``niah_multikey_3``: the same with UUID keys and UUID values;
* ``distractor``: 4 named keys in natural prose, "The access code for Lisbon is 4821907." ... "What is the access
  code for Osaka?" -- the distractor task of the tiered-recall issue, usable with depths and seeds like passkey.
"""

from __future__ import annotations

from dataclasses import dataclass

from .needles import KeyedNeedles

__all__ = ["NiahMultikey1", "NiahMultikey2", "NiahMultikey3", "Distractor"]


@dataclass
class NiahMultikey1(KeyedNeedles):
    n_keys: int = 4
    name = "niah_multikey_1"


@dataclass
class NiahMultikey2(KeyedNeedles):
    haystack: str = "needles"
    name = "niah_multikey_2"


@dataclass
class NiahMultikey3(KeyedNeedles):
    haystack: str = "needles"
    keys: str = "uuids"
    values: str = "uuids"
    name = "niah_multikey_3"


@dataclass
class Distractor(KeyedNeedles):
    keys: str = "cities"
    n_keys: int = 4
    phrasing: str = "access"
    name = "distractor"
