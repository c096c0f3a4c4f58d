"""The task contract and the task registry.

A task turns ``(tokenizer, length, depth, seed)`` into a :class:`~kvslim.eval.tasks.prompt.Prompt` (deterministic: the
same arguments give the same token ids in any process) and scores one model + cache on it. Prompts never depend on
the recipe, so every recipe sees identical prompts. Tasks are dataclasses whose fields are their options; the options
are part of a run's configuration.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from collections.abc import Callable
from typing import Any

from ...errors import InvalidInput
from ..harness.engine import ONE_CALL, PrefillPlan, eos_ids, greedy, prefill, score_answer, teacher_logprob
from .prompt import Prompt

__all__ = ["Task", "RecallTask", "TASKS", "get_task", "task_rng", "run_retrieval", "score_answer"]

# task name -> "module:Class" (imported on demand)
TASKS: dict[str, str] = {
    "passkey": "kvslim.eval.tasks.passkey:Passkey",
    "needle": "kvslim.eval.tasks.needle:Needle",
    "multi-needle": "kvslim.eval.tasks.multi_needle:MultiNeedle",
    "fidelity": "kvslim.eval.tasks.fidelity:Fidelity",
    # the RULER-style suite (kvslim.eval.harness.suite): retrieval, multi-hop tracing, aggregation
    "niah_single_1": "kvslim.eval.tasks.niah_single:NiahSingle1",
    "niah_single_2": "kvslim.eval.tasks.niah_single:NiahSingle2",
    "niah_single_3": "kvslim.eval.tasks.niah_single:NiahSingle3",
    "niah_multikey_1": "kvslim.eval.tasks.niah_multikey:NiahMultikey1",
    "niah_multikey_2": "kvslim.eval.tasks.niah_multikey:NiahMultikey2",
    "niah_multikey_3": "kvslim.eval.tasks.niah_multikey:NiahMultikey3",
    "niah_multivalue": "kvslim.eval.tasks.niah_multivalue:NiahMultivalue",
    "niah_multiquery": "kvslim.eval.tasks.niah_multiquery:NiahMultiquery",
    "vt": "kvslim.eval.tasks.variable_tracking:VariableTracking",
    "cwe": "kvslim.eval.tasks.common_words:CommonWords",
    "fwe": "kvslim.eval.tasks.frequent_words:FrequentWords",
    "distractor": "kvslim.eval.tasks.niah_multikey:Distractor",
    # reuse (issue 24): one context, several questions or a long answer (kvslim.eval.tasks.reuse)
    "multi-turn": "kvslim.eval.tasks.multi_turn:MultiTurn",
    "multi-request": "kvslim.eval.tasks.multi_request:MultiRequest",
    "long-list": "kvslim.eval.tasks.long_list:LongList",
    "long-copy": "kvslim.eval.tasks.long_copy:LongCopy",
}


class Task:
    """Base class: ``build`` a prompt, ``run`` one cell. Subclasses are dataclasses (fields = options)."""

    name: str = ""
    uses_depth: bool = True  # False: the grid's depth axis collapses to [0.0]
    has_success: bool = True  # False: the task reports a score only (fidelity)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        raise NotImplementedError

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Callable[[], Any],
            plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        """Score one cell, prefilling as ``plan`` says (:class:`~kvslim.eval.harness.engine.PrefillPlan`, the
        recipe's, decided by the grid runner); returns at least ``success``, ``score``, ``answer``, ``kv_bytes``."""
        raise NotImplementedError

    batchable: bool = False  # True: run_batch gives what run would, for prompts of one length (kvslim.eval.harness.batch)

    def run_batch(self, model: Any, tokenizer: Any, prompts: list[Prompt], make_cache: Callable[[], Any],
                  plan: PrefillPlan = ONE_CALL) -> list[dict[str, Any]]:
        """Score several cells of one recipe and length in batched passes (only when ``batchable``)."""
        from ..harness.batch import run_retrieval_batch

        if not self.batchable:
            raise NotImplementedError(f"task {self.name} has no batched run")
        return [self.finish(r) for r in run_retrieval_batch(model, tokenizer, prompts, make_cache, plan)]

    def finish(self, res: dict[str, Any]) -> dict[str, Any]:
        """What the task adds to :func:`run_retrieval`'s result (batched runs call it per cell)."""
        return res


def task_rng(task: str, seed: int, length: int, depth: float) -> random.Random:
    """The cell's random source: a function of the task and the grid coordinates only (never of the recipe)."""
    return random.Random(f"kvslim-niah|{task}|{seed}|{length}|{depth:.6f}")


def get_task(name: str, **options: Any) -> Task:
    """A task instance by name; unknown names list the known ones."""
    if name not in TASKS:
        raise InvalidInput(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    klass = getattr(importlib.import_module(module), cls)
    fields = {f.name for f in dataclasses.fields(klass) if not f.name.startswith("_")}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidInput(f"task {name!r} has no option {', '.join(unknown)}; its options are {', '.join(sorted(fields)) or 'none'}")
    return klass(**options)


def run_retrieval(
    model: Any, tokenizer: Any, prompt: Prompt, make_cache: Callable[[], Any], agnostic: bool = False,
    plan: PrefillPlan = ONE_CALL,
) -> dict[str, Any]:
    """Prefill, graded score (log-prob of ``prompt.answer_ids``), greedy answer; success = every answer string found.
    A tiered cache adds ``cold_bytes`` and ``fetched_bytes`` (:class:`~kvslim.eval.harness.engine.Prefilled`).

    ``score`` is the teacher-forced log-probability in nats of the expected answer tokens (higher is better, 0 is
    certainty); ``retrieved`` the fraction of ``prompt.answers`` found in the greedy answer. ``agnostic``: the
    context (``prompt.ids[:prompt.question_start]``) is prefilled alone before the question, so a compressing cache
    compresses it without knowing the question; otherwise the whole prompt is one prefill (question-aware).
    ``shared_prefill`` (True, only when it happened): the context came from another recipe's recorded prefill
    (:mod:`kvslim.eval.harness.share`, when ``plan.shared`` holds a pool). ``plan``: how the prefill is fed
    (:class:`~kvslim.eval.harness.engine.PrefillPlan`).
    """
    pre = prefill(model, prompt.ids, make_cache(), split=prompt.question_start if agnostic else 0, plan=plan)
    logprob = teacher_logprob(model, pre, prompt.answer_ids)
    out = greedy(model, pre, prompt.max_new_tokens, eos_ids(tokenizer, model))
    answer = tokenizer.decode(out, skip_special_tokens=True).strip()
    success, retrieved = score_answer(answer, prompt.answers)
    return {
        "success": success,
        "retrieved": retrieved,
        "score": round(logprob, 5),
        "logprob": round(logprob, 5),
        "answer": answer,
        "kv_bytes": pre.kv_bytes,
        **pre.tier_fields(),
        **({"shared_prefill": True} if pre.shared else {}),
    }


class RecallTask(Task):
    """A task scored as RULER scores: ``score`` = ``retrieved`` (its ``string_match_all``: the fraction of the
    expected strings found in the greedy answer); ``success`` = all found; ``logprob`` kept beside them."""

    batchable = True

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Callable[[], Any],
            plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        return self.finish(run_retrieval(model, tokenizer, prompt, make_cache, plan=plan))

    def finish(self, res: dict[str, Any]) -> dict[str, Any]:
        res["score"] = res["retrieved"]
        return res
