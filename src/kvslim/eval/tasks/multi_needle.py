"""Multi-needle retrieval: k numbers for one invented key spread through natural text; retrieve all of them.

The multi-value variant of RULER's needle tasks (Hsieh et al. 2024, section 3.1, "MV"): needles
"One of the magic numbers of <name> is <n>." sit at depths ``d + (1 - d) * i / k`` (i = 0..k-1), so ``depth`` places the
first one and the rest follow evenly to the end. Score: the fraction of the k numbers found in the greedy answer;
success: all k found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInput
from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, run_retrieval, task_rng
from .facts import random_name
from .haystack import encode, pydoc_sentences
from .prompt import Prompt, assemble

__all__ = ["MultiNeedle"]

INSTRUCTION = "Read the following document carefully. Some magic numbers are hidden in it. I will ask you for them.\n\n"


@dataclass
class MultiNeedle(Task):
    """Options: ``k`` needles, ``max_new_tokens`` (default 8 per needle + 8), ``chat``."""

    k: int = 3
    max_new_tokens: int = 0
    chat: bool | None = None

    name = "multi-needle"

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 16:
            raise InvalidInput(f"multi-needle needs 1 <= k <= 16 needles, got {self.k}")

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        key = random_name(rng)
        numbers = [str(n) for n in rng.sample(range(10000, 100000), self.k)]
        sentences = pydoc_sentences()
        ids, pos, nids, start, hay = assemble(
            tokenizer,
            length=length,
            depths=[depth + (1 - depth) * i / self.k for i in range(self.k)],
            needles=[f" One of the magic numbers of {key} is {n}." for n in numbers],
            sentences=sentences,
            anchor=rng.randrange(len(sentences)),
            instruction=INSTRUCTION,
            question=f"What are all the magic numbers of {key}?",
            primer=f"The magic numbers of {key} are",
            chat=self.chat,
        )
        return Prompt(ids, pos, nids, start, hay, answers=numbers, answer_ids=encode(tokenizer, " " + ", ".join(numbers)),
                      max_new_tokens=self.max_new_tokens or 8 * self.k + 8, meta={"key": key})

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any, plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        res = run_retrieval(model, tokenizer, prompt, make_cache, plan=plan)
        res["score"] = res["retrieved"]  # the fraction retrieved; the log-prob stays in "logprob"
        return res
