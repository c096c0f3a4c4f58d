"""Multi-turn retrieval: several questions about different needles of one haystack, in one conversation.

``k`` keyed needles ("One of the special magic numbers for <key> is: <value>.", RULER's wording) sit in Python's
documentation, the first at the grid's depth and the others at random depths (:func:`kvslim.eval.tasks.reuse.keyed_prompt`).
Turn 0 asks for the needle at ``depth``; each answer is decoded into the cache (greedy) and the next question is
appended after it as a new user turn, so the cache is reused across turns as a chat server reuses it (SCBench's
multi-turn mode). Scored per turn: a turn is answered when its value is in its greedy answer; the cell's ``score``
is the fraction of turns answered, ``success`` all of them, ``turns`` the per-turn records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, task_rng
from .prompt import Prompt
from .reuse import check_turns, keyed_prompt, run_conversation

__all__ = ["MultiTurn"]


@dataclass
class MultiTurn(Task):
    """Options: ``k`` questions (needles, 1..16; ``--needles``), ``max_new_tokens`` (answer budget per turn; 0:
    16), ``chat``, ``agnostic`` (prefill the context alone before the first question)."""

    k: int = 4
    max_new_tokens: int = 0
    chat: bool | None = None
    agnostic: bool = False

    name = "multi-turn"

    def __post_init__(self) -> None:
        check_turns(self.k, self.name)

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        return keyed_prompt(self.name, tokenizer, length, depth, rng, self.k, self.chat, "turn", self.max_new_tokens)

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any,
            plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        return run_conversation(model, tokenizer, prompt, make_cache, agnostic=self.agnostic, plan=plan)
