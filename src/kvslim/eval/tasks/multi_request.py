"""Multi-request retrieval: one context prefilled once without a question, forked, each fork asked another question.

The prompt is the multi-turn task's haystack (``k`` keyed needles, :func:`kvslim.eval.tasks.reuse.keyed_prompt`), but each
question follows the context directly, as a separate request sharing the prefix (SCBench's multi-request mode, what
a server with prefix caching does). With ``agnostic`` (the default) the context is prefilled once alone, so a
compressing cache compresses it without any question, and each request continues a fork of that cache
(:func:`kvslim.fork_cache`: hot tier copied, recall's cold rows shared); ``agnostic=False`` prefills context +
question in a fresh cache per request (question-aware, nothing reused) on the same prompts. Scored per request, as
multi-turn; the record adds ``requests_hot_bytes`` / ``requests_cold_bytes`` (every request's cache together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..harness.engine import ONE_CALL, PrefillPlan
from .base import Task, task_rng
from .prompt import Prompt
from .reuse import check_turns, keyed_prompt, run_requests

__all__ = ["MultiRequest"]


@dataclass
class MultiRequest(Task):
    """Options: ``k`` requests (needles, 1..16; ``--needles``), ``max_new_tokens`` (answer budget per request; 0:
    16), ``chat``, ``agnostic`` (True: prefill the context once and fork it; False: one full prefill per request)."""

    k: int = 4
    max_new_tokens: int = 0
    chat: bool | None = None
    agnostic: bool = True

    name = "multi-request"

    def __post_init__(self) -> None:
        check_turns(self.k, self.name)

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        return keyed_prompt(self.name, tokenizer, length, depth, rng, self.k, self.chat, "request", self.max_new_tokens)

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any,
            plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        return run_requests(model, tokenizer, prompt, make_cache, agnostic=self.agnostic, plan=plan)
