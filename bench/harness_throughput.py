"""Cells per minute of the niah harness, one by one against batched or chunked prefill, side by side in one run.

Runs the same small grid (default: SmolLM2, passkey, 1000 tokens, 5 depths x 2 seeds, recipe ``full``) several
times into fresh temporary stores, alternating the configurations (``--configs``: ``BATCH:THREADS`` pairs, or
``BATCH:THREADS:CHUNK`` with a ``--prefill-chunk``) round by round so machine noise hits them alike; reports each configuration's median cells per minute over the rounds, the
ratio to the first configuration, and whether every record (answer, success, retrieved, KV bytes) equals the first
configuration's and by how much the log-probabilities differ. Prints one JSON line at the end and writes it to
``results/harness_throughput.json`` (or ``--out``); ``bench/ruler_baseline.py`` quotes every
``results/harness_throughput*.json`` in ``docs/ruler.md``.

    python bench/harness_throughput.py                              # 1:1 vs 5:1 vs 10:1, 2 rounds
    python bench/harness_throughput.py --configs 1:1,1:2,5:1,5:2 --rounds 1
    python bench/harness_throughput.py --model gemma3-270m --task niah_single_1 --length 8000 --depths 0,0.5,1 \
        --seeds 0 --configs 1:1,1:1:512 --rounds 1 --out results/harness_throughput_gemma.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--recipes", default="full")
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--configs", default="1:1,5:1,10:1", help="BATCH:THREADS pairs, the first is the reference")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="results/harness_throughput.json", help="the JSON written (relative: the repo)")
    args = ap.parse_args()

    import torch

    from kvslim.eval.harness.runner import Grid, load_pair, run_grid
    from kvslim.eval.harness.store import ResultStore

    configs = [(*(int(x) for x in c.split(":")), 0)[:3] for c in args.configs.split(",")]
    pair = load_pair(args.model)
    grid = Grid(task=args.task, model=args.model, recipes=args.recipes.split(","), lengths=[args.length],
                depths=[float(d) for d in args.depths.split(",")], seeds=[int(s) for s in args.seeds.split(",")])
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    recs: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for batch, threads, chunk in configs:
                out = Path(tmp) / f"r{rnd}-b{batch}-t{threads}-c{chunk}"
                t0 = time.perf_counter()
                res = run_grid(grid, out, pair=pair, threads=threads, progress=False, batch=batch, prefill_chunk=chunk)
                minutes = (time.perf_counter() - t0) / 60
                rates[(batch, threads, chunk)].append(res["ran"] / minutes)
                print(f"round {rnd} batch {batch} threads {threads} prefill chunk {chunk}: {res['ran']} cells in "
                      f"{minutes * 60:.1f} s = {res['ran'] / minutes:.1f} cells/min", flush=True)
                recs.setdefault((batch, threads, chunk), {
                    (r["recipe"], r["length"], r["depth"], r["seed"]): r for r in ResultStore(out).records()})
    torch.set_num_threads(configs[0][1])
    ref = recs[configs[0]]
    summary = []
    base = statistics.median(rates[configs[0]])
    for c in configs:
        mine = recs[c]
        same = all(all(mine[k][f] == ref[k][f] for f in ("answer", "success", "retrieved", "kv_bytes")) for k in ref)
        dlp = max(abs(mine[k]["logprob"] - ref[k]["logprob"]) for k in ref)
        med = statistics.median(rates[c])
        summary.append({"batch": c[0], "threads": c[1], "prefill_chunk": c[2], "cells_per_min": round(med, 2),
                        "speedup": round(med / base, 3), "records_equal": same, "max_logprob_diff": dlp})
        print(f"batch {c[0]:>2} threads {c[1]} chunk {c[2]}: {med:6.1f} cells/min  x{med / base:.2f}  records equal: {same}  "
              f"max |d logprob| {dlp:.2e}")
    line = {"bench": "harness_throughput", "model": args.model, "task": args.task, "length": args.length,
            "recipes": args.recipes, "cells": len(ref), "rounds": args.rounds, "results": summary}
    out = Path(__file__).resolve().parents[1] / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(line, indent=1) + "\n")  # docs/ruler.md quotes it (bench/ruler_baseline.py)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
