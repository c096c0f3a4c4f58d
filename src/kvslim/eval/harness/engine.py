"""The model calls every task shares: prefill into a cache, teacher-forced log-probabilities, greedy decoding,
and the scoring of an answer against the expected strings.

All calls go through the model's own ``forward`` with an explicit ``cache=`` object, exactly the path
``model.generate(..., cache=c)`` takes, so any transformers ``Cache`` (a kvslim compressed cache included) is used
as it would be in generation. Positions come from ``cache.get_seq_length()`` (logical length), as in generate.

Shapes: ``ids`` is a list of ``T`` token ids (batch 1); logits are float32 ``[V]`` per position.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .share import Shared

__all__ = ["PrefillPlan", "ONE_CALL", "Prefilled", "prefill", "prefill_chunks", "teacher_logprob", "greedy",
           "eos_ids", "score_answer"]


@dataclass(frozen=True)
class PrefillPlan:
    """How one recipe's prompts are prefilled, decided once per recipe by the grid runner
    (:func:`kvslim.eval.harness.caches.prefill_plan`) and passed down to :func:`prefill` through the executors and
    the tasks' ``run``.

    ``chunk``: tokens per prefill call (0: the whole prompt, or each side of the question split, in one call); the
    harness's ``--prefill-chunk``, given only to chunk-invariant recipes. For the plain ``DynamicCache`` it changes
    nothing but float rounding, and on models with sliding-window layers (Gemma 3) it is much cheaper: one call over
    T tokens scores every local layer's T x T block through a mask, chunks of C score C x (window + C). An eviction
    cache, though, would see C-token calls and compress after each one, so the harness allows it only for
    chunk-invariant recipes (:func:`kvslim.cache.recipe.chunk_invariant`).

    ``shared``: the pool of recorded context prefills (:class:`kvslim.eval.harness.share.Shared`) this recipe's
    question-agnostic context is replayed from or recorded into, given only to recipes whose cache declares it may
    share one (``shares_context_prefill``); None: every prefill runs the model.
    """

    chunk: int = 0
    shared: Shared | None = None

    def calls(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The prefill calls covering ``[start, stop)`` under this plan (:func:`prefill_chunks`)."""
        return prefill_chunks(start, stop, self.chunk)


#: the plan of a prefill nobody planned: one call per side of the question split, nothing shared
ONE_CALL = PrefillPlan()


def prefill_chunks(start: int, stop: int, chunk: int = 0) -> list[tuple[int, int]]:
    """``[(a, b), ...]`` covering ``[start, stop)`` in calls of at most ``chunk`` tokens (one call if 0).

    No call is left holding a single token where the range has more: a one-token remainder joins the call before it
    (that call then holds chunk + 1 tokens). A one-token forward is a decode step for some caches (recall's dense
    prefill selects blocks in it), so a lone last token would compute something else than one call does."""
    n = int(chunk)
    if n <= 0 or stop - start <= n:
        return [(start, stop)]
    out = [(a, min(a + n, stop)) for a in range(start, stop, n)]
    if n > 1 and out[-1][1] - out[-1][0] == 1:
        out[-2:] = [(out[-2][0], stop)]
    return out


class Prefilled:
    """A cache holding a whole prompt, the logits after its last token and the bytes the cache held then.

    ``kv_bytes`` is the hot tier (``nbytes()``). A tiered cache (one with ``tier_nbytes()``) also gives
    ``cold_bytes`` (held in its cold tier after the prefill) and, once :func:`greedy` ran, ``fetched_bytes``: the
    most cold-tier bytes one decode step of the answer fetched (None: no tiers, or no decode step ran). ``shared``:
    the context came from another cache's recorded prefill (:mod:`kvslim.eval.harness.share`), not from a forward pass.
    """

    def __init__(self, cache: Any, last_logits: Any, kv_bytes: int, n_tokens: int, cold_bytes: int | None = None,
                 shared: bool = False) -> None:  # fmt: skip
        self.cache = cache
        self.last_logits = last_logits  # [V] float32: the distribution of the token after the prompt
        self.kv_bytes = kv_bytes
        self.n_tokens = n_tokens
        self.cold_bytes = cold_bytes
        self.fetched_bytes: int | None = None
        self.shared = shared  # the context was fed from another cache's recorded prefill (kvslim.eval.harness.share)

    def tier_fields(self) -> dict[str, int]:
        """The record fields of the cold tier: ``cold_bytes`` and ``fetched_bytes``, where the cache has them."""
        out = {"cold_bytes": self.cold_bytes, "fetched_bytes": self.fetched_bytes}
        return {k: v for k, v in out.items() if v is not None}


def _forward(model: Any, ids: list[int], cache: Any, keep: int = 1) -> Any:
    import torch

    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0].float()  # [keep, V]


def prefill(model: Any, ids: list[int], cache: Any, split: int = 0, plan: PrefillPlan = ONE_CALL) -> Prefilled:
    """Run the prompt through ``model`` into ``cache``; measure the bytes held afterwards.

    ``split = 0``: one call (a compressing cache compresses after the whole prompt: question-aware). ``0 < split <
    len(ids)``: ``ids[:split]`` (the context) in a first call, the rest (the question) in a second, so the cache
    compresses the context before it sees the question (question-agnostic). ``plan``: with a ``chunk``, each of
    those calls is cut into calls of at most the chunk; with a ``shared`` pool, a context fed in one call is
    replayed from (or recorded into) the pool (:mod:`kvslim.eval.harness.share`).
    """
    import torch

    from ...memory import cache_nbytes, cache_tiers

    if not 0 <= split < len(ids):
        raise ValueError(f"split {split} outside [0, {len(ids)})")
    context = plan.calls(0, split) if split else []
    shared, replayed = plan.shared, False
    with torch.inference_mode():
        if shared is not None and len(context) == 1:  # the context alone, in one call: shareable (kvslim.eval.harness.share)
            cache, replayed = shared.prefill_context(model, ids[:split], cache, lambda c: _forward(model, ids[:split], c))
            context = []
        for a, b in context + plan.calls(split, len(ids)):
            logits = _forward(model, ids[a:b], cache, keep=1)[-1]
    tiers = cache_tiers(cache)
    return Prefilled(cache, logits, cache_nbytes(cache), len(ids), None if tiers is None else tiers["cold"], replayed)


def close_cache(cache: Any) -> None:
    """Release what ``cache`` holds outside its tensors (a tiered cache's cold files), if it can."""
    if callable(getattr(cache, "close", None)):
        cache.close()


def teacher_logprob(model: Any, pre: Prefilled, target: list[int]) -> float:
    """Sum of ``log p(target[i] | prompt, target[:i])`` under teacher forcing, in nats.

    Runs on a deep copy of ``pre.cache`` so the prefilled cache stays as it was for decoding.
    """
    import torch

    if not target:
        return 0.0
    with torch.inference_mode():
        total = float(torch.log_softmax(pre.last_logits, -1)[target[0]])
        if len(target) > 1:
            cache = copy.deepcopy(pre.cache)
            try:
                logits = _forward(model, target[:-1], cache, keep=len(target) - 1)  # [n-1, V]
            finally:  # a tiered copy's cold files (store=disk: a temporary folder) go now, not at collection
                close_cache(cache)
            lp = torch.log_softmax(logits, -1)
            total += float(lp[torch.arange(len(target) - 1), torch.tensor(target[1:])].sum())
    return total


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: set[int] = set()
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def greedy(model: Any, pre: Prefilled, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding after the prompt, one token per forward through ``pre.cache`` (which it extends); a tiered
    cache's largest per-step fetch goes to ``pre.fetched_bytes``."""
    import torch

    from ...memory import cache_tiers

    out: list[int] = []
    logits = pre.last_logits
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            if tok in stop:
                break
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            logits = _forward(model, [tok], pre.cache, keep=1)[-1]
            tiers = cache_tiers(pre.cache)
            if tiers is not None:
                pre.fetched_bytes = max(pre.fetched_bytes or 0, tiers["fetched"])
    return out


def score_answer(answer: str, expected: list[str]) -> tuple[bool, float]:
    """``(all found, fraction found)``: each expected string searched case-insensitively in the answer."""
    if not expected:
        raise ValueError("nothing to look for")
    found = [e.lower() in answer.lower() for e in expected]
    return all(found), sum(found) / len(found)
