"""Needle in natural text: one random synthetic fact hidden at depth d in Python's reference documentation.

The haystack is prose from ``pydoc_data.topics`` (always installed with Python); the needle is a fact about an
invented person or object (:mod:`kvslim.eval.tasks.facts`), so only the context can supply the answer. Success: the answer
appears in the greedy answer; graded score: its teacher-forced log-probability (nats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, run_retrieval, task_rng
from .facts import random_fact
from .haystack import encode, pydoc_sentences
from .prompt import Prompt, assemble

__all__ = ["Needle"]

INSTRUCTION = "Read the following document carefully. Somewhere in it there is one fact that does not belong. I will ask you about that fact.\n\n"


@dataclass
class Needle(Task):
    """Options: ``max_new_tokens`` (answer budget), ``chat`` (None: the chat template when the model has one),
    ``agnostic`` (prefill the context before the question, so a compressing cache cannot use the question)."""

    max_new_tokens: int = 12
    chat: bool | None = None
    agnostic: bool = False

    name = "needle"

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        fact = random_fact(rng)
        sentences = pydoc_sentences()
        ids, pos, nids, start, hay = assemble(
            tokenizer,
            length=length,
            depths=[depth],
            needles=[fact.needle],
            sentences=sentences,
            anchor=rng.randrange(len(sentences)),
            instruction=INSTRUCTION,
            question=fact.question,
            primer=fact.primer,
            chat=self.chat,
        )
        return Prompt(ids, pos, nids, start, hay, answers=[fact.answer], answer_ids=encode(tokenizer, " " + fact.answer),
                      max_new_tokens=self.max_new_tokens, meta={"needle": fact.needle.strip()})

    batchable = True  # run_batch: kvslim.eval.harness.batch, the same records

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any, plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        return run_retrieval(model, tokenizer, prompt, make_cache, agnostic=self.agnostic, plan=plan)
