"""The shared machinery of the reuse tasks (issue 24): one context, several questions, in one conversation or in
forks of one prefilled cache, and answers long enough to need different blocks while decoding.

* :func:`turn_pieces` - the token ids around a later user turn of a conversation: what closes the assistant's answer
  and opens the next user message (the chat template rendered around placeholders; a blank line for a base model).
* :class:`Turn` - one question after the context: the ids that ask it, the strings a correct answer holds, the
  teacher-forced answer and the answer budget. A prompt keeps its turns in ``Prompt.meta["turns"]``; ``Prompt.ids``
  is the context followed by turn 0 and ``Prompt.question_start`` is where turn 0 starts, so a question-agnostic and
  a question-aware run share every prompt (the split is the same as in every other task).
* :func:`keyed_prompt` - ``k`` RULER-style keyed needles ("One of the special magic numbers for <key> is: <value>.")
  in natural prose, needle 0 at the grid's depth and the others at random depths, one question per needle.
* :func:`run_conversation` - every turn in one cache: the answer of turn i is decoded into the cache (greedy, one
  token per forward), then the next question is appended after it (multi-turn).
* :func:`run_requests` - the context prefilled once alone (question-agnostic), forked (:func:`kvslim.fork_cache`),
  each fork asked one question (multi-request); ``agnostic=False`` gives each question a fresh cache prefilled with
  context + question in one call instead (question-aware, nothing reused), on the same prompt.

Scoring per turn: ``success`` (every expected string found in the greedy answer, case-insensitively), ``retrieved``
(the fraction found), ``logprob`` (teacher-forced, nats). A cell's ``score`` is the fraction of turns answered, its
``success`` that all were, its ``turns`` the per-turn results.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ...errors import InvalidInput
from ..harness.engine import (
    ONE_CALL,
    Prefilled,
    PrefillPlan,
    close_cache,
    eos_ids,
    greedy,
    prefill,
    prefill_chunks,
    score_answer,
    teacher_logprob,
)
from .haystack import encode, pydoc_sentences
from .needles import PHRASINGS, count_in, haystack_text, needle_depths
from .prompt import Prompt, assemble, frame_for
from .values import draw

__all__ = ["Turn", "turn_pieces", "keyed_prompt", "run_conversation", "run_requests", "check_turns", "MAX_TURNS"]

MAX_TURNS = 16
_PH = ("\x00KVSLIM-A\x00", "\x00KVSLIM-B\x00", "\x00KVSLIM-C\x00")


@dataclass
class Turn:
    """One question after the context (see the module docstring)."""

    ids: list[int]  # what asks it: for turn 0 the prompt's tail; later, what follows the previous answer
    answers: list[str]
    answer_ids: list[int]
    max_new_tokens: int
    question: str = ""


def check_turns(k: int, what: str) -> None:
    if not 1 <= k <= MAX_TURNS:
        raise InvalidInput(f"{what} needs 1 <= k <= {MAX_TURNS} questions, got {k}")


def turn_pieces(tokenizer: Any, chat: bool | None = None) -> tuple[list[int], bool]:
    """``(between, chat)``: the ids between an assistant's answer and the next user message's content (the answer's
    end-of-turn and the next user header); a base model has none (the question text starts with a blank line)."""
    frame = frame_for(tokenizer, chat)
    if not frame.chat:
        return [], False
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PH[0]}, {"role": "assistant", "content": _PH[1]}, {"role": "user", "content": _PH[2]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    between = text.partition(_PH[1])[2].partition(_PH[2])[0]
    if not between:
        raise InvalidInput("the chat template does not render a second user turn; run with --no-chat")
    return encode(tokenizer, between), True


def later_turn_ids(tokenizer: Any, question: str, primer: str, chat: bool | None = None) -> list[int]:
    """The ids that close the previous answer and ask ``question`` in a new user turn, with the answer ``primer``."""
    between, is_chat = turn_pieces(tokenizer, chat)
    if is_chat:
        return between + encode(tokenizer, question) + list(frame_for(tokenizer, chat).suffix) + encode(tokenizer, primer)
    return encode(tokenizer, "\n\n" + question + "\n") + encode(tokenizer, primer)


def request_ids(tokenizer: Any, question: str, primer: str, chat: bool | None = None) -> list[int]:
    """The ids after the context that ask ``question`` (what ``frame_pieces`` puts after the haystack)."""
    frame = frame_for(tokenizer, chat)
    if frame.chat:
        return encode(tokenizer, "\n\n" + question) + list(frame.suffix) + encode(tokenizer, primer)
    return encode(tokenizer, "\n\n" + question + "\n") + encode(tokenizer, primer)


def keyed_prompt(name: str, tokenizer: Any, length: int, depth: float, rng: random.Random, k: int,
                 chat: bool | None, follow: str, budget: int = 0) -> Prompt:  # fmt: skip
    """``k`` keyed needles (words -> 7-digit numbers) in Python's documentation, one question per needle; question
    0 asks the needle at ``depth``. ``follow``: ``"turn"`` (later questions are user turns after the previous
    answer) or ``"request"`` (each question follows the context directly). ``budget``: answer tokens per question
    (0: 16)."""
    ph = PHRASINGS["magic"]
    per = budget or 16
    for _ in range(20):  # redraw in the rare case a value also occurs in the haystack text
        keys = draw(rng, "words", k)
        vals = draw(rng, "numbers", k, avoid=keys)
        depths, order = needle_depths(rng, depth, k)
        needles = [ph.needle.format(kind="numbers", key=keys[i], value=vals[i]) for i in order]
        qs = [ph.one.format(kind1="number", key=key) for key in keys]
        primers = [ph.primer_one.format(kind1="number", key=key) for key in keys]
        sentences = pydoc_sentences()
        ids, pos, nids, start, hay = assemble(
            tokenizer, length=length, depths=depths, needles=needles, sentences=sentences,
            anchor=rng.randrange(len(sentences)), instruction=ph.instruction.format(kind="numbers"),
            question=qs[0], primer=primers[0], chat=chat,
        )  # fmt: skip
        p = Prompt(ids, pos, nids, start, hay, answers=list(vals), answer_ids=encode(tokenizer, " " + vals[0]),
                   max_new_tokens=per)  # fmt: skip
        if all(count_in(haystack_text(tokenizer, p), v) == 1 for v in vals):
            break
    else:
        raise RuntimeError("could not place values that occur exactly once")  # a bug: clashes are rare
    make = later_turn_ids if follow == "turn" else request_ids
    turns = [Turn(ids[p.question_start :], [vals[0]], encode(tokenizer, " " + vals[0]), per, qs[0])]
    turns += [Turn(make(tokenizer, qs[i], primers[i], chat), [vals[i]], encode(tokenizer, " " + vals[i]), per, qs[i])
              for i in range(1, k)]  # fmt: skip
    extra = sum(len(t.ids) for t in turns[1:]) + k * per if follow == "turn" else \
        max(len(t.ids) for t in turns) - len(turns[0].ids) + per
    p.max_new_tokens = extra  # what the grid checks against the model's context: every later token of the cell
    p.meta = {"keys": keys, "depths": depths, "target": order.index(0), "needles": [n.strip() for n in needles],
              "turns": turns}  # fmt: skip
    return p


def _feed(model: Any, cache: Any, ids: list[int], chunk: int = 0) -> Any:
    """Append ``ids`` to ``cache`` (in calls of at most ``chunk`` tokens, the plan's); the logits after the last one."""
    import torch

    from ..harness.engine import _forward

    with torch.inference_mode():
        for a, b in prefill_chunks(0, len(ids), chunk):
            logits = _forward(model, ids[a:b], cache, keep=1)[-1]
    return logits


def _answer(model: Any, tokenizer: Any, pre: Prefilled, turn: Turn, stop: set[int]) -> tuple[dict[str, Any], list[int]]:
    """Score one turn on ``pre`` and decode its answer into the cache: ``(result, tokens not yet fed)``."""
    lp = teacher_logprob(model, pre, turn.answer_ids)
    before = int(pre.cache.get_seq_length())
    out = greedy(model, pre, turn.max_new_tokens, stop)
    fed = int(pre.cache.get_seq_length()) - before
    answer = tokenizer.decode(out, skip_special_tokens=True).strip()
    ok, frac = score_answer(answer, turn.answers)
    res = {"success": ok, "retrieved": frac, "logprob": round(lp, 5), "answer": answer, "expected": turn.answers,
           "new_tokens": len(out)}  # fmt: skip
    return res, out[fed:]


def _cell(turns: list[dict[str, Any]], kv_bytes: int, pre: Prefilled) -> dict[str, Any]:
    n = len(turns)
    return {
        "success": all(t["success"] for t in turns),
        "score": sum(t["success"] for t in turns) / n,  # the fraction of turns answered
        "retrieved": round(sum(t["retrieved"] for t in turns) / n, 5),
        "logprob": round(sum(t["logprob"] for t in turns) / n, 5),
        "answer": " | ".join(t["answer"] for t in turns),
        "kv_bytes": kv_bytes,
        "turns": turns,
        **pre.tier_fields(),
    }


def run_conversation(model: Any, tokenizer: Any, prompt: Prompt, make_cache: Callable[[], Any],
                     agnostic: bool = False, plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:  # fmt: skip
    """Every turn in one cache (multi-turn): the context and turn 0 prefilled (``agnostic``: the context alone
    first), each answer decoded into the cache, then the next turn's ids appended after it. ``kv_bytes`` is the hot
    tier after the first prefill (as in every task), ``kv_bytes_last`` after the last answer."""
    turns: list[Turn] = prompt.meta["turns"]
    stop = eos_ids(tokenizer, model)
    pre = prefill(model, prompt.ids, make_cache(), split=prompt.question_start if agnostic else 0, plan=plan)
    kv_bytes, results, pending = pre.kv_bytes, [], []
    for i, turn in enumerate(turns):
        if i:
            pre.last_logits = _feed(model, pre.cache, pending + turn.ids, plan.chunk)
        res, pending = _answer(model, tokenizer, pre, turn, stop)
        results.append(res)
    from ...memory import cache_nbytes

    return {**_cell(results, kv_bytes, pre), "kv_bytes_last": cache_nbytes(pre.cache),
            **({"shared_prefill": True} if pre.shared else {})}  # fmt: skip


def run_requests(model: Any, tokenizer: Any, prompt: Prompt, make_cache: Callable[[], Any],
                 agnostic: bool = True, plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:  # fmt: skip
    """One question per cache (multi-request). ``agnostic``: the context prefilled once alone and forked, each fork
    asked one question; else each question in a fresh cache prefilled with context + question in one call.
    ``kv_bytes``: request 0's hot tier after its question; ``requests_hot_bytes`` / ``requests_cold_bytes``: every
    request's cache together after its answer (a shared cold row counted once: :func:`kvslim.cache.fork.family_nbytes`)."""
    from ...cache.fork import family_nbytes, fork_cache
    from ...memory import cache_nbytes, cache_tiers

    turns: list[Turn] = prompt.meta["turns"]
    stop = eos_ids(tokenizer, model)
    qs = prompt.question_start
    context = prompt.ids[:qs]
    base = prefill(model, context, make_cache(), plan=plan) if agnostic else None
    caches, results, kv_bytes, fetched = ([base.cache] if base else []), [], 0, None
    for i, turn in enumerate(turns):
        if base is not None:
            cache = fork_cache(base.cache)
            tiers = cache_tiers(cache)
            pre = Prefilled(cache, _feed(model, cache, turn.ids, plan.chunk), 0, qs + len(turn.ids))
            pre.kv_bytes = cache_nbytes(cache)
            pre.cold_bytes = None if tiers is None else tiers["cold"] + tiers.get("cold_shared", 0)
        else:
            pre = prefill(model, context + turn.ids, make_cache(), plan=plan)
        res, _ = _answer(model, tokenizer, pre, turn, stop)
        results.append(res)
        caches.append(pre.cache)
        if i == 0:
            kv_bytes, first = pre.kv_bytes, pre
        if pre.fetched_bytes is not None:
            fetched = max(fetched or 0, pre.fetched_bytes)
    first.fetched_bytes = fetched
    fam = family_nbytes(caches)
    for c in caches[1:] if base is not None else []:  # the forks made here (the harness closes what it made)
        close_cache(c)
    return {**_cell(results, kv_bytes, first), "requests_hot_bytes": fam["hot"], "requests_cold_bytes": fam["cold"]}


def turns_json(turns: list[Turn]) -> list[dict[str, Any]]:
    """Turns as plain data (tests and debugging)."""
    return [asdict(t) for t in turns]
