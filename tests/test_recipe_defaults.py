"""Issue 24, part 5: a method's defaults keep the needle, and changing a default keeps every record's meaning.

`recall` with no parameters was top-8 by summary without pins, which lost most needles (docs/recipes.md, "Defaults
against presets"); its defaults are now the `recall-fp8` preset's structure (k=12, 4 pinned blocks per KV head with
the block after each). Canonical strings omit a parameter only at its *recorded* default (`Params.recorded`), so
the string of every preset, which results stores and reports key rows by, is what it was; a stored `recall` row
(the old defaults) reads back as `recall:k=8,pin=0,span=1` (`read_back`), never as today's `recall`.
"""

from __future__ import annotations

import pytest

from kvslim.cache.recipe import PRESETS, canonical, identity, parse_recipe, read_back
from kvslim.errors import InvalidInput

# canonical strings before the defaults changed (main at 7f0773d): records are keyed by these
BEFORE = {"stream": "window", "csa": "blocks", "hca": "heavy", "v4-fp8": "v4+fp8", "v4-tq3": "v4+tq3",
          "latent32": "latent:r=32", "full-kivi2": "full+kivi2", "recall-fp8": "recall:k=12,pin=4,span=2+fp8",
          "full-kivi4": "full+kivi4", "full-tq4": "full+tq4", "full-tq3": "full+tq3", "full-fp8": "full+fp8"}  # fmt: skip


def test_preset_records_keep_their_keys():
    assert set(BEFORE) == set(PRESETS)
    assert {p: canonical(p) for p in PRESETS} == BEFORE
    assert {p: identity(p) for p in PRESETS} == BEFORE


def test_plain_recall_is_the_presets_structure():
    r = parse_recipe("recall")
    assert (r.get("k"), r.get("pin"), r.get("span"), r.get("m"), r.get("w")) == (12, 4, 2, 32, 128)
    assert canonical("recall") == "recall:k=12,pin=4,span=2"  # not "recall": that key means the old defaults
    assert canonical("recall+fp8") == canonical("recall-fp8")
    old = parse_recipe("recall:k=8,pin=0")  # what a stored `recall` row computed
    assert (old.get("pin"), old.get("span")) == (0, 1)
    # a canonical string names what today's defaults would change, so it parses back to itself; a stored `recall`
    # (written under the old defaults) reads back as the old computation, not as today's `recall`
    assert canonical(old) == "recall:k=8,pin=0,span=1" and parse_recipe(canonical(old)) == old
    assert read_back("recall") == canonical(old) and read_back("recall-fp8") == BEFORE["recall-fp8"]
    assert read_back("recall:store=disk") == "recall:k=8,pin=0,span=1"


@pytest.mark.parametrize("text", ["recall", "recall:k=8", "recall:k=8,pin=0", "recall:k=2,m=4", "recall:prefill=select",
                                  "recall:pin=0+fp8", "recall:k=16,pin=4+fp8", "recall:dir=/x,store=disk,k=8,pin=0",
                                  *PRESETS])  # fmt: skip
def test_canonical_strings_parse_and_read_back_to_themselves(text):
    r = parse_recipe(text)
    assert parse_recipe(canonical(r)) == r and canonical(canonical(r)) == canonical(r)
    assert read_back(canonical(r)) == identity(r)  # a record of it reads back as what ran


@pytest.mark.parametrize(("text", "pin", "span"), [
    ("recall:k=0", 0, 1),                 # every block fetched (lossless): nothing to pin
    ("recall:k=4", 0, 1),                 # too few fetched blocks for 4 x 2 pins
    ("recall:m=4,k=2,w=16,sinks=2", 0, 1),
    ("recall:prefill=select", 0, 1),      # pins need the dense prefill
    ("recall:k=8", 4, 2),
    ("recall:pin=4", 4, 1),               # an explicit pin keeps span=1 (its meaning before auto)
    ("recall:pin=0", 0, 1),
    ("recall:k=16,pin=4", 4, 1),
    ("recall:span=3", 4, 3),
])  # fmt: skip
def test_auto_pins_resolve_to_values(text, pin, span):
    r = parse_recipe(text)
    assert (r.get("pin"), r.get("span")) == (pin, span)
    assert "-1" not in canonical(text)


@pytest.mark.parametrize("text", ["recall:pin=4,prefill=select", "recall:k=4,pin=4,span=2", "recall:span=0",
                                  "recall:pin=-2", "recall:k=4,span=2"])  # fmt: skip
def test_explicit_conflicts_are_still_refused(text):
    with pytest.raises(InvalidInput):
        parse_recipe(text)
