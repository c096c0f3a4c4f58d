"""Long output, copying: repeat a passage of the context word for word, an answer longer than the exact window.

A passage of ``words`` random dictionary words (sentences of 6-10 words; the dictionary is
:func:`kvslim.eval.tasks.values.vocabulary`, so nothing is downloaded and no model knows it by heart) sits at the grid's
depth in Python's documentation between two markers; the question asks to copy it, and the answer is primed with
the opening marker (so even a small model starts copying rather than restating the question). The answer (about 1.5-2.5 tokens
per word: well over a 128-token window for the default 100 words) needs a moving part of the passage at every
decode step while its own first tokens leave the window: a cache that keeps only the window of generated tokens,
or that chose its blocks at the prompt, loses its place. Scored by the longest common subsequence of words
(lowercase, punctuation dropped) over the passage's words (``score``, partial credit); ``success`` = the whole
passage copied in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInput
from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, run_retrieval, task_rng
from .haystack import encode, pydoc_sentences
from .prompt import Prompt, assemble
from .values import vocabulary

__all__ = ["LongCopy", "passage", "copy_score", "words_of"]

INSTRUCTION = "The following document contains a marked passage. Read it carefully: I will ask you to copy it.\n\n"
QUESTION = "Copy the marked passage word for word, from its first word to its last."
PRIMER = "Here the marked passage begins:"  # the marker before the passage: the answer continues from it
_WORD = re.compile(r"[a-z]+")


def passage(rng: Any, n: int) -> str:
    """``n`` random dictionary words as sentences of 6-10 words (capitalised, ending in a full stop)."""
    vocab = vocabulary()
    out, left = [], n
    while left:
        m = min(left, rng.randint(6, 10))
        ws = [rng.choice(vocab) for _ in range(m)]
        out.append(" ".join([ws[0].capitalize(), *ws[1:]]) + ".")
        left -= m
    return " ".join(out)


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copy_score(answer: str, text: str) -> float:
    """Longest common subsequence of the answer's and the passage's words, over the passage's word count."""
    a, b = words_of(answer), words_of(text)
    if not b:
        raise ValueError("nothing to copy")
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(b)


@dataclass
class LongCopy(Task):
    """Options: ``words`` in the passage (8..1000), ``max_new_tokens`` (0: the passage's tokens + 16), ``chat``,
    ``agnostic`` (prefill the context alone before the question)."""

    words: int = 100
    max_new_tokens: int = 0
    chat: bool | None = None
    agnostic: bool = False

    name = "long-copy"

    def __post_init__(self) -> None:
        if not 8 <= self.words <= 1000:
            raise InvalidInput(f"long-copy needs 8 <= words <= 1000, got {self.words}")

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        text = passage(rng, self.words)
        sentences = pydoc_sentences()
        needle = f" Here the marked passage begins: {text} Here the marked passage ends."
        ids, pos, nids, start, hay = assemble(
            tokenizer, length=length, depths=[depth], needles=[needle], sentences=sentences,
            anchor=rng.randrange(len(sentences)), instruction=INSTRUCTION, question=QUESTION, primer=PRIMER,
            chat=self.chat,
        )  # fmt: skip
        target = encode(tokenizer, " " + text)
        return Prompt(ids, pos, nids, start, hay, answers=[text], answer_ids=target,
                      max_new_tokens=self.max_new_tokens or len(target) + 16, meta={"passage": text})  # fmt: skip

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any,
            plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        res = run_retrieval(model, tokenizer, prompt, make_cache, agnostic=self.agnostic, plan=plan)
        return score_copy(res, prompt)


def score_copy(res: dict[str, Any], prompt: Prompt) -> dict[str, Any]:
    """``score`` / ``retrieved``: the fraction of the passage copied (word LCS); ``success``: all of it."""
    frac = copy_score(res["answer"], prompt.meta["passage"])
    res["score"] = res["retrieved"] = round(frac, 5)
    res["success"] = frac == 1.0
    return res
