"""Passkey retrieval: a 5-digit key hidden at depth d in repeated filler, asked for at the end.

Mohtashami & Jaggi 2023 ("Landmark Attention", section 4.2 and appendix) introduced the task; the filler and the
needle wording follow theirs. Success: the key appears in the greedy answer. Graded score: the teacher-forced
log-probability (nats) of the key's tokens after the answer primer "The pass key is".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, run_retrieval, task_rng
from .haystack import encode, filler_sentences
from .prompt import Prompt, assemble

__all__ = ["Passkey"]

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)


@dataclass
class Passkey(Task):
    """Options: ``max_new_tokens`` (answer budget), ``chat`` (None: the chat template when the model has one),
    ``agnostic`` (prefill the context before the question, so a compressing cache cannot use the question)."""

    max_new_tokens: int = 8
    chat: bool | None = None
    agnostic: bool = False

    name = "passkey"

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        key = str(rng.randint(10000, 99999))
        sentences = filler_sentences()
        ids, pos, nids, start, hay = assemble(
            tokenizer,
            length=length,
            depths=[depth],
            needles=[f" The pass key is {key}. Remember it. {key} is the pass key."],
            sentences=sentences,
            anchor=rng.randrange(len(sentences)),
            instruction=INSTRUCTION,
            question="What is the pass key? Answer with the 5-digit number only.",
            primer="The pass key is",
            chat=self.chat,
        )
        return Prompt(ids, pos, nids, start, hay, answers=[key], answer_ids=encode(tokenizer, " " + key),
                      max_new_tokens=self.max_new_tokens, meta={"key": key})

    batchable = True  # run_batch: kvslim.eval.harness.batch, the same records

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any, plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        return run_retrieval(model, tokenizer, prompt, make_cache, agnostic=self.agnostic, plan=plan)
