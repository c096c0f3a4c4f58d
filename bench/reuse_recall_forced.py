"""Teacher-force ``full``'s answer on one reuse turn and print, per recipe, each answer token's log-probability.

    python bench/reuse_recall_forced.py TASK LENGTH DEPTH SEED TURN "RECIPE;RECIPE;..."

TASK is ``multi-request`` (the context prefilled alone, forked, question TURN asked) or ``multi-turn`` (the turns
before TURN answered greedily by the recipe itself). ``full``'s greedy answer (10 tokens) is fed to each recipe one
token per forward; printed per token: ``'tok':logprob`` of ``full``'s token, and ``['other']`` where the recipe's
top token differs. Diagnostics of issue 24, part 4 (docs/reuse.md), not recipes:

* ``oracle:RECIPE`` ranks the blocks of every decode step by the query's exact block log-sum-exp (the whole cold
  tier read) instead of the summaries: the best selection of that size;
* ``RECIPE|L0-L1:key=value,...`` overrides recall parameters in layers L0..L1 (e.g. ``|0-8:k=0,pin=0,span=1``:
  every block in layers 0-8).

    python bench/reuse_recall_forced.py multi-request 2000 0 1 3 "full;recall-fp8;oracle:recall:k=12,pin=0,span=1+fp8"
"""
from __future__ import annotations

import dataclasses
import sys
import time

ORACLE: dict = {"on": False, "layer": None}


def main() -> None:
    import torch

    import kvslim
    import kvslim.cache.methods.recall.recall as rr
    from kvslim.cache import make_cache
    from kvslim.cache.fork import fork_cache
    from kvslim.cache.methods.recall.segments import block_lse
    from kvslim.eval.harness.engine import Prefilled, _forward, eos_ids, greedy, prefill
    from kvslim.eval.tasks import reuse
    from kvslim.eval.tasks.base import get_task

    torch.set_num_threads(1)
    task, length, d, s, turn = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    recipes = sys.argv[6].split(";")
    model, tok = kvslim.load("smollm2-135m")
    p = get_task(task, agnostic=True).build(tok, length, d, s)
    turns, qs, stop = p.meta["turns"], p.question_start, eos_ids(tok, model)
    score, segments = rr.score_blocks, rr.RecallLayer._decode_segments

    def exact_score(kind, q, summ, gqa="max"):  # oracle: the decode query's exact block log-sum-exp
        x = ORACLE["layer"]
        if not ORACLE["on"] or x is None or q.shape[2] != 1:
            return score(kind, q, summ, gqa)
        nt = summ.shape[2]
        return block_lse(q, x.cold_k.read(0, nt * x.m), None, x.m, q.shape[-1] ** -0.5)[:, :, None, :]

    def tracked(self, query, sinks, tail, *rest):
        ORACLE["layer"] = self
        try:
            return segments(self, query, sinks, tail, *rest)
        finally:
            ORACLE["layer"] = None

    rr.score_blocks, rr.RecallLayer._decode_segments = exact_score, tracked

    def session(recipe):
        ORACLE["on"] = recipe.startswith("oracle:")
        recipe, _, ov = recipe.removeprefix("oracle:").partition("|")
        cache = make_cache(model, recipe)
        if ov:
            ls, _, kv = ov.partition(":")
            lo, _, hi = ls.partition("-")
            kw = {a: int(b) for a, b in (x.split("=") for x in kv.split(","))}
            for x in cache.layers:
                if isinstance(x, rr.RecallLayer) and int(lo) <= x.ctx.index <= int(hi or lo):
                    x.spec = dataclasses.replace(x.spec, p=dataclasses.replace(x.spec.p, **kw))
        if task == "multi-request":
            base = prefill(model, p.ids[:qs], cache)
            c = fork_cache(base.cache)
            return Prefilled(c, reuse._feed(model, c, turns[turn].ids), 0, qs + len(turns[turn].ids))
        pre = prefill(model, p.ids, cache, split=qs)
        pending: list[int] = []
        for i, t in enumerate(turns[: turn + 1]):
            if i:
                pre.last_logits = reuse._feed(model, pre.cache, pending + t.ids)
            if i == turn:
                return pre
            res, pending = reuse._answer(model, tok, pre, t, stop)
            print(f"  [{recipe}] turn {i}: {res['answer']!r} ok={res['success']}", flush=True)
        return None

    ref = None
    for r in ["full", *recipes]:
        t0 = time.time()
        pre = session(r)
        if ref is None:
            ref = greedy(model, pre, 10, stop)
            print("full:", repr(tok.decode(ref)), flush=True)
            continue
        logits, row = pre.last_logits, []
        with torch.inference_mode():
            for st, t in enumerate(ref):
                lp = torch.log_softmax(logits.float(), -1)
                top = int(lp.argmax())
                row.append(f"{tok.decode([t])!r}:{float(lp[t]):.2f}" + ("" if top == t else f"[{tok.decode([top])!r}]"))
                if st + 1 < len(ref):
                    logits = _forward(model, [t], pre.cache, keep=1)[-1]
        print(r, " ".join(row), f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
