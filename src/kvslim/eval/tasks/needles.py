"""The shared machinery of the RULER-style needle tasks: where needles go, how they read, one configurable task.

* :func:`needle_depths` places ``n`` needles: the first (the one the grid's ``depth`` names) at ``depth``, the others
  at random depths from the cell's random source, returned sorted with the order they were drawn in, so the caller
  knows where every needle went (``Prompt.meta["depths"]``: the depth of each needle, in prompt order).
* :class:`Phrasing` is the wording of a needle, its question and the answer primer; ``magic`` is RULER's
  ("One of the special magic numbers for <key> is: <value>."), ``access`` the distractor wording of the tiered-recall
  issue ("The access code for Lisbon is <value>.").
* :class:`KeyedNeedles` is the one task behind every retrieval variant (single, multi-key, multi-value, multi-query):
  ``n_keys`` keys each with ``n_values`` values, ``n_queries`` of the keys asked for; the haystack is the repeated
  passkey filler (``noise``), Python's documentation (``essay``), or needles with other keys (``needles``). The
  task files (:mod:`~kvslim.eval.tasks.niah_single`, ...) only choose defaults.

Scoring (RULER's ``string_match_all``): ``retrieved`` = the fraction of the expected values found in the greedy
answer (case-insensitive), also the cell's ``score``; ``success`` = all found; ``logprob`` = the teacher-forced
log-probability of the answer in the order the question lists them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInput
from .base import RecallTask, task_rng
from .haystack import encode, filler_sentences, pydoc_sentences
from .prompt import Prompt, assemble
from .values import KINDS, draw

__all__ = ["needle_depths", "Phrasing", "PHRASINGS", "KeyedNeedles", "HAYSTACKS", "count_in", "haystack_text"]

HAYSTACKS = ("noise", "essay", "needles")


def needle_depths(rng: random.Random, depth: float, n: int, *, ordered: bool = False) -> tuple[list[float], list[int]]:
    """Depths of ``n`` needles, sorted, and ``order``: ``order[j]`` = which drawn needle sits j-th in the prompt.

    Needle 0 is at ``depth``; the others are uniform in [0, 1] (``ordered``: in [depth, 1], ascending, so drawn order
    = prompt order, as a chain of assignments needs). On a tie needle 0 comes first.
    """
    drawn = [depth] + [rng.uniform(depth if ordered else 0.0, 1.0) for _ in range(n - 1)]
    if ordered:
        drawn = [depth, *sorted(drawn[1:])]
    order = sorted(range(n), key=lambda i: (drawn[i], i))
    return [drawn[i] for i in order], order


@dataclass(frozen=True)
class Phrasing:
    needle: str  # .format(kind=..., key=..., value=...); starts with a space
    instruction: str  # .format(kind=...)
    one: str  # question for one value of one key: .format(kind1=..., key=...)
    many: str  # question for several values or keys: .format(kind=..., keys=...)
    primer_one: str
    primer_many: str


PHRASINGS = {
    "magic": Phrasing(
        needle=" One of the special magic {kind} for {key} is: {value}.",
        instruction="Some special magic {kind} are hidden within the following text. Make sure to memorize them. "
                    "I will quiz you about the {kind} afterwards.\n\n",
        one="What is the special magic {kind1} for {key} mentioned in the provided text?",
        many="What are all the special magic {kind} for {keys} mentioned in the provided text?",
        primer_one="The special magic {kind1} for {key} mentioned in the provided text is",
        primer_many="The special magic {kind} for {keys} mentioned in the provided text are",
    ),
    "access": Phrasing(
        needle=" The access code for {key} is {value}.",
        instruction="The following text hides the access codes of several places. Memorize them: "
                    "I will ask you for one of them afterwards.\n\n",
        one="What is the access code for {key}? Answer with the code only.",
        many="What are all the access codes for {keys}? Answer with the codes only.",
        primer_one="The access code for {key} is",
        primer_many="The access codes for {keys} are",
    ),
}
_SINGULAR = {"numbers": "number", "words": "word", "uuids": "uuid", "cities": "city"}
# answer tokens per value (a UUID is ~20-25 tokens in most tokenizers), plus a margin for the words around them
_VALUE_TOKENS = {"numbers": 8, "words": 10, "uuids": 28, "cities": 6}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count_in(text: str, s: str) -> int:
    """Case-insensitive occurrences of ``s`` in ``text`` (what the string-match scoring sees)."""
    return text.lower().count(s.lower())


def haystack_text(tokenizer: Any, p: Prompt) -> str:
    """The decoded haystack with its needles (from the first haystack token to the end of the last needle or
    segment): where an answer must occur exactly once."""
    end = p.haystack_start + p.haystack_tokens + sum(map(len, p.needle_ids))
    return tokenizer.decode(p.ids[p.haystack_start : end])


@dataclass
class KeyedNeedles(RecallTask):
    """Options: ``haystack`` (noise, essay, needles), ``keys`` / ``values`` (kinds: numbers, words, uuids, cities),
    ``n_keys`` (keys with needles: 1 + distractors), ``n_values`` (values per key), ``n_queries`` (keys asked for),
    ``phrasing`` (magic, access), ``max_new_tokens`` (0: enough for the answer), ``chat``."""

    haystack: str = "essay"
    keys: str = "words"
    values: str = "numbers"
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1
    phrasing: str = "magic"
    max_new_tokens: int = 0
    chat: bool | None = None

    name = "niah"

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise InvalidInput(f"unknown haystack {self.haystack!r}: choose from {', '.join(HAYSTACKS)}")
        for what in ("keys", "values"):
            if getattr(self, what) not in KINDS:
                raise InvalidInput(f"unknown {what} kind {getattr(self, what)!r}: choose from {', '.join(KINDS)}")
        if self.phrasing not in PHRASINGS:
            raise InvalidInput(f"unknown phrasing {self.phrasing!r}: choose from {', '.join(PHRASINGS)}")
        if not (1 <= self.n_keys <= 16 and 1 <= self.n_values <= 16 and 1 <= self.n_queries <= self.n_keys):
            raise InvalidInput("needs 1 <= n_keys <= 16, 1 <= n_values <= 16 and 1 <= n_queries <= n_keys")
        if self.haystack == "needles" and self.keys == "cities":
            raise InvalidInput("a haystack of needles needs hundreds of keys: use keys words or uuids, not cities")
        if self.max_new_tokens < 0:
            raise InvalidInput(f"max_new_tokens must be 0 (automatic) or more, got {self.max_new_tokens}")

    def _texts(self, queried: list[str]) -> tuple[str, str, str]:
        ph, kind = PHRASINGS[self.phrasing], self.values
        instruction = ph.instruction.format(kind=kind)
        if len(queried) == 1 and self.n_values == 1:
            return instruction, ph.one.format(kind1=_SINGULAR[kind], key=queried[0]), \
                ph.primer_one.format(kind1=_SINGULAR[kind], key=queried[0])
        keys = _join(queried)
        return instruction, ph.many.format(kind=kind, keys=keys), ph.primer_many.format(kind=kind, keys=keys)

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        ph = PHRASINGS[self.phrasing]
        for _ in range(20):  # redraw in the rare case an answer also occurs in the haystack text
            p = self._draw(tokenizer, length, depth, rng, ph)
            text = haystack_text(tokenizer, p)
            if all(count_in(text, v) == 1 for v in p.answers):
                return p
        raise RuntimeError("could not place answers that occur exactly once")  # a bug: clashes are rare

    def _draw(self, tokenizer: Any, length: int, depth: float, rng: random.Random, ph: Phrasing) -> Prompt:
        keys = draw(rng, self.keys, self.n_keys)
        vals = draw(rng, self.values, self.n_keys * self.n_values, avoid=keys)
        table = [(k, vals[i * self.n_values + j]) for i, k in enumerate(keys) for j in range(self.n_values)]
        queried = keys[: self.n_queries]
        # the needle the depth names: the first value of the first key asked for; the rest at random depths
        depths, order = needle_depths(rng, depth, len(table))
        needles = [ph.needle.format(kind=self.values, key=table[i][0], value=table[i][1]) for i in order]
        if self.haystack == "needles":
            n_fill = max(8, length // 12)  # more needles than fit: a filler needle has well over 12 tokens
            fill_keys = draw(rng, self.keys, n_fill, avoid=keys + vals)
            fill_vals = draw(rng, self.values, n_fill, avoid=keys + vals + fill_keys)
            sentences = [ph.needle.format(kind=self.values, key=k, value=v) for k, v in zip(fill_keys, fill_vals, strict=True)]
        else:
            sentences = filler_sentences() if self.haystack == "noise" else pydoc_sentences()
        instruction, question, primer = self._texts(queried)
        ids, pos, nids, start, hay = assemble(
            tokenizer, length=length, depths=depths, needles=needles, sentences=sentences,
            anchor=rng.randrange(len(sentences)), instruction=instruction, question=question, primer=primer,
            chat=self.chat,
        )
        answers = [v for k, v in table if k in queried]
        budget = self.max_new_tokens or _VALUE_TOKENS[self.values] * len(answers) + 8
        return Prompt(ids, pos, nids, start, hay, answers=answers, answer_ids=encode(tokenizer, " " + ", ".join(answers)),
                      max_new_tokens=budget, meta={"keys": queried, "depths": depths, "target": order.index(0),
                                                   "needles": [n.strip() for n in needles]})
