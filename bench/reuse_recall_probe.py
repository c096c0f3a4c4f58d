"""Where a ``recall`` recipe loses a multi-turn cell (issue 24, part 4): which blocks it pins and fetches per turn.

Runs one ``multi-turn`` cell (question-agnostic, as ``bench/reuse_baseline.py`` does) on SmolLM2 with a recall
recipe and, for the turn asked, prints the turn's needle (its token span and blocks), how many (layer, KV head)
pairs pinned one of those blocks after the question's forward call, and at each decode step of the answer how many
fetched one (pins + top-k by summary). Every turn's greedy answer is printed as the harness scores it.

    python bench/reuse_recall_probe.py --length 2000 --depth 0 --seed 1 --turn 1 --recipe recall-fp8
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--depth", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--turn", type=int, default=1, help="the turn to inspect (0-based); the run stops after it")
    ap.add_argument("--recipe", default="recall-fp8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    import kvslim
    import kvslim.cache.methods.recall.recall as rr
    from kvslim.cache import make_cache
    from kvslim.eval.harness.engine import eos_ids, prefill
    from kvslim.eval.tasks import reuse
    from kvslim.eval.tasks.base import get_task

    torch.set_num_threads(args.threads)
    model, tok = kvslim.load(args.model)
    p = get_task("multi-turn", agnostic=True).build(tok, args.length, args.depth, args.seed)
    log: list[torch.Tensor] = []
    select = rr.select_blocks

    def recording(scores, valid, k, nbr):  # the decode rule's selection, per layer in order: [KV heads, blocks]
        idx, ok = select(scores, valid, k, nbr)
        if scores.shape[2] == 1:
            log.append(idx[0, :, 0].clone())
        return idx, ok

    rr.select_blocks = recording
    cache = make_cache(model, args.recipe)
    layers = [x for x in cache.layers if isinstance(x, rr.RecallLayer)]
    stop = eos_ids(tok, model)
    pre = prefill(model, p.ids, cache, split=p.question_start)
    m, sinks, heads = layers[0].m, layers[0].spec.sinks, layers[0].heads  # set by the first forward
    pending: list[int] = []
    for i, turn in enumerate(p.meta["turns"]):
        if i:
            pre.last_logits = reuse._feed(model, pre.cache, pending + turn.ids)
        key = p.meta["keys"][i]
        j = next(a for a, n in enumerate(p.meta["needles"]) if key in n)
        pos, n = p.needle_positions[j], len(p.needle_ids[j])
        blocks = {(c - sinks) // m for c in range(pos, pos + n) if c >= sinks}
        if i == args.turn:
            pins = [set(x.pinned[0, h].tolist()) for x in layers for h in range(heads)] if layers[0].spec.p.pin else []
            hit = sum(bool(blocks & s) for s in pins)
            print(f"turn {i}: needle {key!r} at tokens {pos}..{pos + n}, blocks {sorted(blocks)}; "
                  f"(layer, KV head) pairs pinning one: {hit}/{len(pins)}")  # fmt: skip
            log.clear()
        res, pending = reuse._answer(model, tok, pre, turn, stop)
        print(f"turn {i}: answered={res['success']} {res['answer']!r} expected {res['expected']}")
        if i == args.turn:
            for s in range(0, len(log), len(layers)):
                got = sum(bool(blocks & set(x[h].tolist())) for x in log[s : s + len(layers)] for h in range(heads))
                print(f"  decode step {s // len(layers)}: pairs fetching a needle block {got}/{len(layers) * heads}")
            break
    cache.close()


if __name__ == "__main__":
    main()
