"""Where a ``recall`` recipe loses a reuse cell (issue 24, part 4): per answer token, which blocks ``full`` attends
and which the recipe fetches.

Runs one ``multi-turn`` or ``multi-request`` cell (question-agnostic, as ``bench/reuse_baseline.py`` does) on SmolLM2
twice: with ``full`` (a plain cache) to get its greedy answer for the turn asked, then with the recall RECIPE, every
turn before the asked one answered greedily by the recipe itself (as the grid does) and the asked turn teacher-forced
on ``full``'s answer tokens, so the first step where the recipe would pick another token is found. Prints:

* the asked needle (its token span and blocks) and how many (layer, KV head) pairs pinned one of its blocks after
  the question's forward call;
* per answer token: ``full``'s token, whether the recipe's top token is the same (and the recipe's log-probability
  of ``full``'s token), how many pairs fetched a needle block, and, from the exact attention of the decode query
  over every token (the cold tier read whole: a diagnostic, not what the method reads), the share of the
  attention that falls on blocks out of the window (``oow``), the share of that which the fetched blocks hold
  (``got``), the share the best ``k`` blocks by exact mass would hold (``oracle``), and the layers that lose the
  most attention mass (``worst``).

    python bench/reuse_recall_probe.py --task multi-request --length 2000 --depth 0 --seed 1 --turn 3
    python bench/reuse_recall_probe.py --task multi-turn --depth 0.75 --seed 1 --turn 1 --recipe "recall:k=12,pin=4,span=2,pinw=1+fp8"
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="multi-turn", choices=("multi-turn", "multi-request"))
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--depth", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--turn", type=int, default=1, help="the turn / request to inspect (0-based)")
    ap.add_argument("--recipe", default="recall-fp8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worst", type=int, default=4, help="layers listed per step as losing the most mass")
    args = ap.parse_args()

    import torch

    import kvslim
    import kvslim.cache.methods.recall.recall as rr
    from kvslim.cache import make_cache
    from kvslim.cache.fork import fork_cache
    from kvslim.eval.harness.engine import Prefilled, _forward, eos_ids, greedy, prefill
    from kvslim.eval.tasks import reuse
    from kvslim.eval.tasks.base import get_task

    torch.set_num_threads(args.threads)
    model, tok = kvslim.load(args.model)
    p = get_task(args.task, agnostic=True).build(tok, args.length, args.depth, args.seed)
    turns = p.meta["turns"]
    stop = eos_ids(tok, model)
    qs = p.question_start

    def session(recipe: str):
        """Yield ``(i, pre)`` ready to answer turn i (earlier turns answered greedily into the cache)."""
        cache = make_cache(model, recipe)
        if args.task == "multi-request":
            base = prefill(model, p.ids[:qs], cache)
            for i, turn in enumerate(turns[: args.turn + 1]):
                if i == args.turn:
                    c = fork_cache(base.cache)
                    yield i, Prefilled(c, reuse._feed(model, c, turn.ids), 0, qs + len(turn.ids))
            return
        pre = prefill(model, p.ids, cache, split=qs)
        pending: list[int] = []
        for i, turn in enumerate(turns[: args.turn + 1]):
            if i:
                pre.last_logits = reuse._feed(model, pre.cache, pending + turn.ids)
            if i == args.turn:
                yield i, pre
                return
            res, pending = reuse._answer(model, tok, pre, turn, stop)
            print(f"[{recipe}] turn {i}: answered={res['success']} {res['answer']!r} expected {res['expected']}")

    # full's answer to the asked turn (the turns before it answered by full itself)
    ref: list[int] = []
    for _, pre in session("full"):
        ref = greedy(model, pre, turns[args.turn].max_new_tokens, stop)
    print(f"full, turn {args.turn}: {tok.decode(ref)!r} (expected {turns[args.turn].answers})")

    key = p.meta["keys"][args.turn]
    j = next(a for a, n in enumerate(p.meta["needles"]) if key in n)
    pos, n = p.needle_positions[j], len(p.needle_ids[j])

    stats: list[dict] = []
    heavy: dict[str, list] = {}
    needles = {}
    on = {"probe": False}
    orig = rr.RecallLayer._decode_segments

    def probed(self, query, sinks, tail, *rest):
        segs = orig(self, query, sinks, tail, *rest)
        if not on["probe"]:
            return segs
        m, h = self.m, self.heads
        nt = self.n_out(self.seen - 1)
        if nt <= 0:
            return segs
        keys = [s.k for s in segs if s.name == "sinks"] + [self.cold_k.read(0, nt * m)]
        keys += [s.k for s in segs if s.name == "window"]
        K = torch.cat(keys, 2).float()  # [1, h, N, d]
        s0 = sum(s.k.shape[2] for s in segs if s.name == "sinks")
        b, hq, _, d = query.shape
        g = hq // h
        logits = torch.matmul(query.float().reshape(b, h, g, d), K.transpose(-1, -2)) / d**0.5
        att = logits.softmax(-1)  # [1, h, g, N] (padding-free cells)
        blk = att[..., s0 : s0 + nt * m].reshape(b, h, g, nt, m).sum(-1).mean(2)[0]  # [h, nt]: mass per block
        fetched = next(s for s in segs if s.name == "fetched")
        sel = torch.zeros(h, nt, dtype=torch.bool)
        rows = fetched.mask[0, :, 0].reshape(h, -1, m).any(-1)  # [h, K] which fetched slots are real
        # the fetched rows' block ids: recover from the cold rows gathered (the segment holds only K/V); use the log
        idx = self._probe_idx
        for hh in range(h):
            sel[hh, idx[hh][rows[hh]]] = True
        kk = self.spec.p.k or nt
        oow = blk.sum(-1)  # [h]
        got = (blk * sel).sum(-1)
        oracle = blk.topk(min(kk, nt), -1).values.sum(-1)
        needle = {(c - self.spec.sinks) // m for c in range(pos, pos + n) if c >= self.spec.sinks}
        nb = [x for x in needle if x < nt]
        for name, bl in needles.items():  # heads that put >= 5 % of their attention on a needle's blocks
            bl = [x for x in bl if x < nt]
            if bl:
                mass = blk[:, bl].sum(-1)
                for hh in (mass >= 0.05).nonzero().flatten().tolist():
                    heavy.setdefault(name, []).append((self.ctx.index, hh, float(mass[hh]), bool(sel[hh, bl].any())))
        stats.append({"layer": self.ctx.index, "oow": oow, "got": got, "oracle": oracle,
                      "needle_mass": blk[:, nb].sum(-1) if nb else torch.zeros(h),
                      "needle_got": (blk[:, nb] * sel[:, nb]).sum(-1) if nb else torch.zeros(h),
                      "needle_fetched": sel[:, nb].any(-1) if nb else torch.zeros(h, dtype=torch.bool)})  # fmt: skip
        return segs

    select = rr.select_blocks
    current: dict = {}

    def recording(scores, valid, k, nbr):
        idx, ok = select(scores, valid, k, nbr)
        if scores.shape[2] == 1 and current.get("layer") is not None:
            current["layer"]._probe_idx = idx[0, :, 0].clone()
        return idx, ok

    def wrapped(self, query, sinks, tail, *rest):
        current["layer"] = self
        try:
            return probed(self, query, sinks, tail, *rest)
        finally:
            current["layer"] = None

    rr.select_blocks = recording
    rr.RecallLayer._decode_segments = wrapped

    for _, pre in session(args.recipe):
        layers = [x for x in pre.cache.layers if isinstance(x, rr.RecallLayer)]
        m, sinks, heads = layers[0].m, layers[0].spec.sinks, layers[0].heads
        blocks = sorted({(c - sinks) // m for c in range(pos, pos + n) if c >= sinks})
        for jj, (q0, ids) in enumerate(zip(p.needle_positions, p.needle_ids, strict=True)):
            kk = next(x for x in p.meta["keys"] if x in p.meta["needles"][jj])
            tag = ("asked " if jj == j else "") + kk
            needles[tag] = sorted({(c - sinks) // m for c in range(q0, q0 + len(ids)) if c >= sinks})
        if layers[0].spec.p.pin:
            pins = [set(x.pinned[0, h][x.pin_ok[0, h]].tolist()) for x in layers for h in range(heads)]
            span = layers[0].spec.p.span
            hit = sum(any(b - o in s for b in blocks for o in range(span)) for s in pins)
            print(f"turn {args.turn}: needle {key!r} at tokens {pos}..{pos + n}, blocks {blocks}; window starts at "
                  f"block {layers[0].n_blocks}; (layer, KV head) pairs pinning one (span incl.): {hit}/{len(pins)}")  # fmt: skip
        logits = pre.last_logits
        first = int(torch.argmax(logits))
        lp = torch.log_softmax(logits, -1)
        print(f"step 0: full {tok.decode([ref[0]])!r} recall {tok.decode([first])!r} lp(full's)={float(lp[ref[0]]):.2f}"
              " (the question's own call: dense)")
        on["probe"] = True
        with torch.inference_mode():
            for s, t in enumerate(ref[:-1], start=1):
                stats.clear()
                heavy.clear()
                logits = _forward(model, [t], pre.cache, keep=1)[-1]
                lp = torch.log_softmax(logits, -1)
                top = int(torch.argmax(logits))
                oow = torch.stack([x["oow"] for x in stats])  # [layers, h]
                got = torch.stack([x["got"] for x in stats])
                orc = torch.stack([x["oracle"] for x in stats])
                lost = oow - got
                worst = lost.mean(1).topk(args.worst)
                nf = int(sum(x["needle_fetched"].sum() for x in stats))
                nm = torch.stack([x["needle_mass"] for x in stats])
                ng = torch.stack([x["needle_got"] for x in stats])
                mark = "" if top == ref[s] else "   <-- differs"
                print(f"step {s}: full {tok.decode([ref[s]])!r} recall {tok.decode([top])!r} lp(full's)="
                      f"{float(lp[ref[s]]):.2f}; needle fetched {nf}/{oow.numel()}, needle mass {float(nm.mean()):.3f} "
                      f"got {float(ng.mean()):.3f}; oow {float(oow.mean()):.3f} got {float(got.sum() / oow.sum()):.2f} "
                      f"oracle {float(orc.sum() / oow.sum()):.2f}; worst layers "
                      + ", ".join(f"{stats[i]['layer']}:{float(oow[i].mean()):.2f}->{float(got[i].mean()):.2f}"
                                  for i in worst.indices.tolist()) + mark)  # fmt: skip
                for name, hs in heavy.items():
                    miss = [f"L{a}h{b}:{c:.2f}" for a, b, c, f in sorted(hs, key=lambda x: -x[2]) if not f]
                    print(f"    {name}: {len(hs)} pairs >= 5 %, {sum(x[3] for x in hs)} fetched; not: {' '.join(miss[:8])}")
        on["probe"] = False
        pre.cache.close()


if __name__ == "__main__":
    main()
