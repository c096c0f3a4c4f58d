"""RULER's common-words extraction (CWE, aggregation; Hsieh et al. 2024, section 3.3).

A numbered list of dictionary words (``" 1. lambda 2. format ..."``) in which ``n_common`` words appear
``freq_common`` times each and every other word ``freq_uncommon`` times, shuffled; the question asks for the
``n_common`` most common words. RULER uses 30 / 3 / 10; a short prompt cannot hold 300 entries, so the common
frequency is lowered to what fits (a tenth of the entries each, at most) and the uncommon one to at most half of it
(lengths too short for 2 and 1 are refused). A list can need more distinct uncommon words than the
dictionary holds (at 16k tokens the half-budget sample :func:`fit_pieces` draws to measure tokens per entry asked
Gemma 3's tokenizer for about 2,500 of 2,101); the uncommon frequency of that list then rises to the least that
fits, and the common words still appear at least twice as often. Lists that fit are unchanged (the Gemma 16k
prompts themselves keep RULER's 30 / 3). The
answers are recounted on the entries that made it into the prompt: every answer word occurs more often than any other word.
The common words never contain one another or any other list word (so a string match cannot confuse them). With
``example`` a small solved example opens the prompt, as in RULER's template. No depth axis.
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
from .values import clash, draw, vocabulary

__all__ = ["CommonWords"]

INSTRUCTION = "Below is a numbered list of words. In these words, some appear more often than others. " \
              "Memorize the ones that appear most often.\n\n"
QUESTION = "Question: What are the {n} most common words in the above list?"
PRIMER = "Answer: The top {n} words that appear most often in the list are:"


def _numbered(words: list[str]) -> list[str]:
    return [f" {i + 1}. {w}" for i, w in enumerate(words)]


@dataclass
class CommonWords(RecallTask):
    """Options: ``n_common`` (words asked for), ``freq_common`` (their count, at most), ``freq_uncommon``,
    ``example``, ``max_new_tokens`` (0: 5 per word + 8), ``chat``."""

    n_common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3
    example: bool = True
    max_new_tokens: int = 0
    chat: bool | None = None

    name = "cwe"
    uses_depth = False

    def __post_init__(self) -> None:
        if not (1 <= self.n_common <= 50 and 1 <= self.freq_uncommon and 2 * self.freq_uncommon <= self.freq_common):
            raise InvalidInput("cwe needs 1 <= n_common <= 50 and 2 * freq_uncommon <= freq_common")

    def _entries(self, rng: random.Random, common: list[str], others: list[str], n: int) -> list[str]:
        f_c = min(self.freq_common, n // (2 * self.n_common))
        f_u = min(self.freq_uncommon, f_c // 2)  # short prompts: both frequencies shrink, common stays >= 2x
        if f_u < 1:
            raise InvalidInput(f"cwe: this length holds about {n} list entries, too few for {self.n_common} common "
                               "words at 2+ occurrences: use a longer length")
        rest = n - f_c * self.n_common
        u = max(1, rest // f_u + 1)
        if u > len(others):  # long prompts: repeat each uncommon word more often rather than run out of words
            f_u = -(-rest // max(1, len(others) - 1))
            u = max(1, rest // f_u + 1)
            if 2 * f_u > f_c or u > len(others):
                raise InvalidInput(f"cwe: this length holds about {n} list entries; the dictionary's {len(others)} "
                                   f"uncommon words would each need {f_u} occurrences, more than half of the common "
                                   f"words' {f_c}: use a shorter length or a larger freq_common")
        words = common * f_c + rng.sample(others, u) * f_u
        rng.shuffle(words)
        return words

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        vocab = vocabulary()
        for _ in range(20):
            common = draw(rng, "word", self.n_common)
            others = [w for w in vocab if not any(clash(w, c) for c in common)]
            instruction = INSTRUCTION
            if self.example:  # its words are "others": the asked words never occur in it
                ex = rng.sample(others, 2 * self.n_common)
                ex_list = ex[: self.n_common] * 2 + ex[self.n_common :]
                rng.shuffle(ex_list)
                instruction += ("Example:" + "".join(_numbered(ex_list)) + "\n" + QUESTION.format(n=self.n_common)
                                + " " + PRIMER.format(n=self.n_common) + " " + " ".join(ex[: self.n_common])
                                + "\n\nNow the list.\n\n")
            lists: list[list[str]] = []

            def make(n: int, common: list[str] = common, others: list[str] = others, lists: list = lists) -> list[str]:
                lists.append(self._entries(rng, common, others, n))
                return _numbered(lists[-1])

            lp = fit_pieces(tokenizer, length=length, make_pieces=make, instruction=instruction,
                            question=QUESTION.format(n=self.n_common), primer=PRIMER.format(n=self.n_common), chat=self.chat)
            counts = Counter(lists[-1][: lp.used])
            top = min(counts[c] for c in common)
            rest = max((v for w, v in counts.items() if w not in common), default=0)
            if top > rest:  # the answer is well defined on what fitted
                break
        else:
            raise RuntimeError("could not build a list whose common words stand out")  # a bug
        return Prompt(lp.ids, [], [], lp.start, lp.haystack_tokens, answers=common,
                      answer_ids=encode(tokenizer, " " + " ".join(common)),
                      max_new_tokens=self.max_new_tokens or 5 * self.n_common + 8,
                      meta={"counts": {c: counts[c] for c in common}, "max_other": rest, "entries": lp.used})
