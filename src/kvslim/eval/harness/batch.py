"""Batched retrieval cells: several prompts of one length through one cache, each answer as if run alone.

Prompts of one grid length have exactly the same number of tokens (prompt assembly is token-exact), so a batch
needs no padding and no attention mask: row ``b`` of every forward pass sees only its own tokens, exactly as a
batch-1 pass would. What differs from one-by-one is arithmetic order inside batched matrix products, which moves
logits by float rounding, and a lossy cache can carry that further (a value near a quantization boundary takes the
other code; a near-tied block the other rank). So a batched record is not always the one-by-one record: its
log-probability (``logprob``, ``score``) agrees within :data:`LOGPROB_TOLERANCE` (measured: identical for ``full``
on SmolLM2; up to 2e-3 for ``recall-fp8`` on SmolLM2, whose attention and block selection are kvslim's own code),
and a shift that size could in principle flip a near-tied greedy token, so an answer, though none did where
measured. The rest of a record (prompt, bytes held, cold and fetched bytes) is computed per row as one by one.
``tests/test_eval_batch.py`` and ``tests/test_eval_batch_bound.py`` check the records against one-by-one ones,
and ``bench/harness_throughput.py`` measures the speed and the agreement on a real model.

Per batch: one prefill ``[B, T]``; the teacher-forced targets (answers of different token lengths) padded on the
right with each row's own last target token -- causal attention keeps padding from reaching the positions scored --
in one pass through a copy of the cache; greedy decoding in ``[B, 1]`` steps until every row has stopped (a
stopped row keeps being fed a token, which no other row sees, and its output is cut where it stopped). KV bytes per
cell (:func:`row_nbytes`): what one row holds -- a tensor whose first dimension is the batch counts 1/B, any other
tensor (a window scalar) whole; a kvslim cache's own ``nbytes()`` / B (the test checks both against batch 1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .engine import ONE_CALL, PrefillPlan, close_cache, eos_ids, score_answer

if TYPE_CHECKING:
    from ..tasks.prompt import Prompt

__all__ = ["LOGPROB_TOLERANCE", "run_retrieval_batch", "batches", "row_nbytes"]

#: How far a batched cell's log-probability may lie from the one-by-one cell's (see the module docstring; the
#: ``--batch`` help and docs/results.md state it): 2.5x the largest difference measured (2e-3, recall-fp8 on SmolLM2).
LOGPROB_TOLERANCE = 5e-3


def _forward(model: Any, rows: list[list[int]], cache: Any, keep: int) -> Any:
    import torch

    x = torch.tensor(rows, dtype=torch.long, device=model.device)
    out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits.float()  # [B, keep, V]


def run_retrieval_batch(model: Any, tokenizer: Any, prompts: list[Prompt], make_cache: Callable[[], Any],
                        plan: PrefillPlan = ONE_CALL) -> list[dict[str, Any]]:
    """:func:`kvslim.eval.tasks.base.run_retrieval` for every prompt (all of one length), in batched passes; the
    prefill in calls of ``plan.chunk`` tokens (a batch never shares a prefill: ``plan.shared`` is not read)."""
    import torch

    from ...memory import cache_tiers

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("a batch holds prompts of one length")
    b = len(prompts)
    cache = make_cache()
    with torch.inference_mode():
        for a, z in plan.calls(0, len(prompts[0])):  # one call, or calls of --prefill-chunk tokens
            last = _forward(model, [p.ids[a:z] for p in prompts], cache, keep=1)[:, -1]  # [B, V]
        kv_bytes = row_nbytes(cache, b)
        tiers = cache_tiers(cache)
        logprobs = _teacher(model, cache, last, [p.answer_ids for p in prompts])
        outs, fetched = _greedy(model, cache, last, [p.max_new_tokens for p in prompts], eos_ids(tokenizer, model))
    extra = {} if tiers is None else {"cold_bytes": tiers["cold"] // b}
    if fetched is not None:
        extra["fetched_bytes"] = fetched // b
    res = []
    for p, lp, out in zip(prompts, logprobs, outs, strict=True):
        answer = tokenizer.decode(out, skip_special_tokens=True).strip()
        success, retrieved = score_answer(answer, p.answers)
        res.append({"success": success, "retrieved": retrieved, "score": round(lp, 5), "logprob": round(lp, 5),
                    "answer": answer, "kv_bytes": kv_bytes, **extra})
    return res


def _teacher(model: Any, cache: Any, last: Any, targets: list[list[int]]) -> list[float]:
    import torch

    first = torch.log_softmax(last, -1)
    totals = [float(first[i, t[0]]) if t else 0.0 for i, t in enumerate(targets)]
    width = max(len(t) for t in targets) - 1
    if width > 0:
        rows = [(t[:-1] + [t[-1]] * (width - len(t) + 1)) if t else [0] * width for t in targets]
        copied = copy.deepcopy(cache)
        try:
            logits = _forward(model, rows, copied, keep=width)  # [B, width, V]
        finally:  # a tiered copy's cold files go now, not at collection
            close_cache(copied)
        lp = torch.log_softmax(logits, -1)
        for i, t in enumerate(targets):
            n = len(t) - 1
            if n > 0:
                totals[i] += float(lp[i, torch.arange(n), torch.tensor(t[1:])].sum())
    return totals


def _greedy(model: Any, cache: Any, last: Any, budgets: list[int], stop: set[int]
            ) -> tuple[list[list[int]], int | None]:
    """Answers, and a tiered cache's largest per-step fetch over the batch (None: no tiers or no decode step)."""
    import torch

    from ...memory import cache_tiers

    outs: list[list[int]] = [[] for _ in budgets]
    live = [n > 0 for n in budgets]
    logits, fetched = last, None
    for _ in range(max(budgets)):
        toks = [int(t) for t in torch.argmax(logits, -1)]
        for i, tok in enumerate(toks):
            if live[i]:
                if tok in stop:
                    live[i] = False
                else:
                    outs[i].append(tok)
                    live[i] = len(outs[i]) < budgets[i]
        if not any(live):
            break
        logits = _forward(model, [[t] for t in toks], cache, keep=1)[:, -1]
        tiers = cache_tiers(cache)
        if tiers is not None:
            fetched = max(fetched or 0, tiers["fetched"])
    return outs, fetched


def batches(todo: list[tuple[Any, Prompt]], size: int) -> list[list[tuple[Any, Prompt]]]:
    """Group ``(cell, prompt)`` pairs by (recipe, prompt length), in order of first appearance, in chunks of ``size``."""
    groups: dict[tuple[str, int], list[tuple[Any, Prompt]]] = {}
    for cell, prompt in todo:
        groups.setdefault((cell.recipe, len(prompt)), []).append((cell, prompt))
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def row_nbytes(cache: Any, b: int) -> int:
    """The bytes one row of a batch-``b`` cache holds: what a batch-1 cache of that row would hold."""
    from ...memory import _held_tensors, cache_nbytes, tensor_nbytes

    layers = getattr(cache, "layers", None)
    if callable(getattr(cache, "nbytes", None)) or layers is None:
        return cache_nbytes(cache) // b
    total = 0
    for layer in layers:
        if callable(getattr(layer, "nbytes", None)):
            total += int(layer.nbytes()) // b
            continue
        seen: set[int] = set()
        for t in _held_tensors(layer):
            if id(t) not in seen:
                seen.add(id(t))
                total += tensor_nbytes(t) // b if t.dim() > 0 and t.shape[0] == b and b > 1 else tensor_nbytes(t)
    return total
