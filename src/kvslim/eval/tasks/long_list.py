"""Long output, aggregation: list every key-value pair of the haystack in one answer.

``k`` keyed needles ("One of the special magic numbers for <key> is: <value>.", words -> 7-digit numbers) sit in
Python's documentation, the first at the grid's depth and the others at random depths; the question asks for all of
them, so the answer is long (about 24 tokens per pair) and each pair needs a different part of the context at a
different decode step: a cache that picks its blocks once, or by the last prompt token, loses the later ones.
Scored by the fraction of values found in the greedy answer (``score`` = ``retrieved``); ``success`` = all found;
``keys_found`` the fraction of keys named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, run_retrieval, task_rng
from .haystack import encode, pydoc_sentences
from .needles import PHRASINGS, count_in, haystack_text, needle_depths
from .prompt import Prompt, assemble
from .reuse import check_turns
from .values import draw

__all__ = ["LongList", "QUESTION", "PRIMER"]

QUESTION = ("List every special magic number hidden in the text together with its key, one pair per line, in the "
            "order they appear.")  # fmt: skip
PRIMER = "The special magic numbers in the text are:\n"
PER_PAIR = 24  # answer tokens per pair: the key, the number and the words around them


@dataclass
class LongList(Task):
    """Options: ``k`` pairs (1..16; ``--needles``), ``max_new_tokens`` (0: 24 per pair + 16), ``chat``,
    ``agnostic`` (prefill the context alone before the question)."""

    k: int = 8
    max_new_tokens: int = 0
    chat: bool | None = None
    agnostic: bool = False

    name = "long-list"

    def __post_init__(self) -> None:
        check_turns(self.k, self.name)

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        ph = PHRASINGS["magic"]
        for _ in range(20):  # redraw in the rare case a value also occurs in the haystack text
            keys = draw(rng, "words", self.k)
            vals = draw(rng, "numbers", self.k, avoid=keys)
            depths, order = needle_depths(rng, depth, self.k)
            needles = [ph.needle.format(kind="numbers", key=keys[i], value=vals[i]) for i in order]
            sentences = pydoc_sentences()
            ids, pos, nids, start, hay = assemble(
                tokenizer, length=length, depths=depths, needles=needles, sentences=sentences,
                anchor=rng.randrange(len(sentences)), instruction=ph.instruction.format(kind="numbers"),
                question=QUESTION, primer=PRIMER, chat=self.chat,
            )  # fmt: skip
            in_order = [(keys[i], vals[i]) for i in order]  # prompt order: the order the answer should list them
            target = "\n".join(f"{key}: {val}" for key, val in in_order)
            p = Prompt(ids, pos, nids, start, hay, answers=[v for _k, v in in_order],
                       answer_ids=encode(tokenizer, target), max_new_tokens=self.max_new_tokens or PER_PAIR * self.k + 16,
                       meta={"keys": [k for k, _v in in_order], "depths": depths, "target": order.index(0),
                             "needles": [n.strip() for n in needles]})  # fmt: skip
            if all(count_in(haystack_text(tokenizer, p), v) == 1 for v in vals):
                return p
        raise RuntimeError("could not place values that occur exactly once")  # a bug: clashes are rare

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any,
            plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        res = run_retrieval(model, tokenizer, prompt, make_cache, agnostic=self.agnostic, plan=plan)
        return score_list(res, prompt)


def score_list(res: dict[str, Any], prompt: Prompt) -> dict[str, Any]:
    """The fraction of values found is the score (partial credit); ``keys_found`` the fraction of keys named."""
    res["score"] = res["retrieved"]
    answer = res["answer"].lower()
    keys = prompt.meta["keys"]
    res["keys_found"] = round(sum(k.lower() in answer for k in keys) / len(keys), 5)
    return res
