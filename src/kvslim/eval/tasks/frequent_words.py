"""RULER's frequent-words extraction (FWE, aggregation; Hsieh et al. 2024, section 3.3).

A text of coded words (3-6 random lowercase letters) whose frequencies follow a Zipf law with exponent ``alpha``
(the word of rank r appears about ``N r^-alpha / sum_k k^-alpha`` times, RULER's alpha = 2), shuffled; the question
asks for the three most frequent. Counts are set from the law (not sampled), then recounted on the words that made
it into the prompt: the third answer occurs more often than the fourth word. Coded words never contain one another.
No depth axis.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInput
from .aggregate import fit_pieces
from .base import RecallTask, task_rng
from .haystack import encode
from .prompt import Prompt
from .values import draw

__all__ = ["FrequentWords"]

INSTRUCTION = "Read the following coded text and track the frequency of each coded word. " \
              "Find the three most frequently appeared coded words.\n\n"
QUESTION = "Question: Do not provide any explanation. What are the three most frequently appeared words in the " \
           "above coded text?"
PRIMER = "Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass
class FrequentWords(RecallTask):
    """Options: ``alpha`` (Zipf exponent), ``vocab`` (distinct coded words), ``max_new_tokens`` (0: 24), ``chat``."""

    alpha: float = 2.0
    vocab: int = 200
    max_new_tokens: int = 0
    chat: bool | None = None

    name = "fwe"
    uses_depth = False

    def __post_init__(self) -> None:
        if not (1.0 <= self.alpha <= 4.0 and 10 <= self.vocab <= 2000):
            raise InvalidInput("fwe needs 1 <= alpha <= 4 and 10 <= vocab <= 2000")

    def _words(self, rng: random.Random, coded: list[str], n: int) -> list[str]:
        z = sum(r ** -self.alpha for r in range(1, len(coded) + 1))
        counts = [max(1, int(n * r ** -self.alpha / z)) for r in range(1, len(coded) + 1)]
        words = [w for w, c in zip(coded, counts, strict=True) for _ in range(c)]
        rng.shuffle(words)
        return words

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        for _ in range(20):
            coded = draw(rng, "coded", self.vocab)
            lists: list[list[str]] = []

            def make(n: int, coded: list[str] = coded, lists: list = lists) -> list[str]:
                lists.append(self._words(rng, coded, n))
                return [" " + w for w in lists[-1]]

            lp = fit_pieces(tokenizer, length=length, make_pieces=make, instruction=INSTRUCTION, question=QUESTION,
                            primer=PRIMER, chat=self.chat)
            ranked = Counter(lists[-1][: lp.used]).most_common()
            if len(ranked) > 3 and ranked[2][1] > ranked[3][1]:
                break
        else:
            raise RuntimeError("could not build a text whose top three words stand out")  # a bug
        top = [w for w, _ in ranked[:3]]
        return Prompt(lp.ids, [], [], lp.start, lp.haystack_tokens, answers=top,
                      answer_ids=encode(tokenizer, " " + " ".join(top)), max_new_tokens=self.max_new_tokens or 24,
                      meta={"counts": dict(ranked[:4]), "words": lp.used})
