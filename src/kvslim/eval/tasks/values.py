"""Random keys and values for the RULER-style tasks: numbers, words, UUID-like strings and city names.

One generator, :func:`draw`, serves every task: ``draw(rng, kind, n, avoid)`` returns ``n`` distinct strings of a
kind, none equal to (or containing, or contained in) a string in ``avoid``, so a prompt never holds two needles whose
answers a string match would confuse. Kinds (after RULER, Hsieh et al. 2024, section 3.1):

* ``numbers``: 7-digit numbers such as ``4821907``;
* ``words``: two dictionary words joined by a hyphen, such as ``lambda-quietly`` (the dictionary is the lowercase
  words of Python's reference documentation, :func:`vocabulary`, so nothing is downloaded);
* ``uuids``: 32 random hex digits in the 8-4-4-4-12 layout of a UUID;
* ``cities``: names from :data:`kvslim.eval.tasks.facts.CITIES` (20 of them, so at most 20 distinct keys);
* ``word`` (one dictionary word) and ``coded`` (3-6 random lowercase letters, RULER's "coded words"), for the
  aggregation tasks.
"""

from __future__ import annotations

import functools
import random
import re

from ...errors import InvalidInput
from .facts import CITIES

__all__ = ["KINDS", "EXTRA_KINDS", "draw", "vocabulary", "letters", "clash"]

KINDS = ("numbers", "words", "uuids", "cities")
EXTRA_KINDS = ("word", "coded")  # single dictionary words; coded words (3-6 random lowercase letters)
_WORD = re.compile(r"[A-Za-z]+")


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    words = {w for key in topics for w in _WORD.findall(topics[key]) if w.islower() and 4 <= len(w) <= 9}
    return tuple(sorted(words))  # sorted: the same order on every Python build


def vocabulary() -> list[str]:
    """The distinct lowercase words of 4-9 letters in ``pydoc_data.topics`` (about 2,000), sorted."""
    return list(_vocabulary())


def letters(rng: random.Random, n: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ") -> str:
    """``n`` random characters of ``alphabet``."""
    return "".join(rng.choice(alphabet) for _ in range(n))


def _one(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        vocab = _vocabulary()
        return f"{rng.choice(vocab)}-{rng.choice(vocab)}"
    if kind == "uuids":
        h = f"{rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if kind == "cities":
        return rng.choice(CITIES)
    if kind == "word":
        return rng.choice(_vocabulary())
    if kind == "coded":
        return letters(rng, rng.randint(3, 6), "abcdefghijklmnopqrstuvwxyz")
    raise InvalidInput(f"unknown value kind {kind!r}: choose from {', '.join(KINDS)}")


def clash(a: str, b: str) -> bool:
    """Whether one string contains the other, case-insensitively (a string match could confuse them)."""
    a, b = a.lower(), b.lower()
    return a in b or b in a


def draw(rng: random.Random, kind: str, n: int, avoid: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``n`` distinct strings of ``kind``; none clashes (one inside the other, case-insensitively) with another or
    with ``avoid``."""
    if kind not in KINDS + EXTRA_KINDS:
        raise InvalidInput(f"unknown value kind {kind!r}: choose from {', '.join(KINDS)}")
    if kind == "cities" and n + len(avoid) > len(CITIES):
        raise InvalidInput(f"only {len(CITIES)} city names exist: {n + len(avoid)} distinct city keys asked for")
    out: list[str] = []
    by_len: dict[int, set[str]] = {}  # taken strings (lowercase) by length: equal lengths clash only when equal
    for t in avoid:
        by_len.setdefault(len(t), set()).add(t.lower())
    tries = 0
    while len(out) < n:
        v = _one(rng, kind)
        tries += 1
        if tries > 100 * (n + 10):
            raise RuntimeError(f"could not draw {n} distinct {kind}")  # a bug: the spaces are large
        low = v.lower()
        if any(low in g if size == len(low) else any(clash(low, t) for t in g) for size, g in by_len.items()):
            continue
        out.append(v)
        by_len.setdefault(len(low), set()).add(low)
    return out
