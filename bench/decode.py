"""Decode ms/token, prefill seconds, KV bytes and peak RSS per recipe, side by side against the stock full cache.

For each model and context length: one prompt of natural text (``pydoc_data.topics``); for every recipe a fresh
cache, one-shot prefill of the prompt (timed), then ``--decode`` greedy tokens one forward at a time (timed per
token, median reported). Times are process CPU time by default (``--clock cpu`` with ``--threads 1``: on a
shared machine, other processes' load does not inflate them); ``--clock wall`` measures elapsed time. The baseline row ``dynamic`` is transformers' own ``DynamicCache`` with sdpa attention;
every other row is ``kvslim.make_cache(model, recipe)``. Recipes run interleaved, ``--repeats`` rounds in rotated
order, and each figure is the median over rounds, so machine load hits all rows alike. Peak RSS is the process's
high-water mark during that row (``/proc/self/clear_refs`` reset before each row; Linux only, else the
process-wide peak). Tiered recipes (``recall``) also report their cold bytes, the cold bytes the last decode step
fetched and the fetched share (tokens fetched per KV head and tiered layer / context) in the JSON rows.

The eviction baselines (``streaming``, ``snapkv``, ``tova``, ``h2o``, ``knorm``, ``expattn``, e.g.
``tova:keep=0.5``; see ``kvslim.cache.methods``) are recipes like the others: their prefill row includes the scoring
(attention probabilities of the observation window, the last query, or every query for H2O; Expected Attention's
query statistics), their decode rows the per-step eviction.

    python bench/decode.py --recipes "full,tova:keep=0.5,snapkv:keep=0.5,h2o:keep=0.5,knorm:keep=0.5,streaming:keep=0.5"
    python bench/decode.py --recipes "full,tova:keep=0.5,expattn:keep=0.5,expattn:keep=0.25"

Roofline: the bench measures the machine's streaming read bandwidth (the best of ``x.sum()`` over a 1 GiB float32
tensor, larger than any cache level, on the same clock as the rows) and prints per row the bytes one decode step
must read (``read_MB``: the weights, counted once, tied embeddings once, an untied input embedding as the one row it
reads; plus the KV bytes the attention reads: ``DynamicCache`` everything it holds, kvslim layers what their
``predict(...)["read"]`` gives, e.g. only the top-k chosen block values), the time those bytes take at that bandwidth
(``floor_ms``) and how far the measured step is from it (``x_floor`` = decode_ms / floor_ms). On a small model
the floor is mostly the weights, and part of the excess is fixed work per step, not bytes: a short context (no KV
to speak of) shows it, e.g. ``--models smollm2-135m --lengths 16 --recipes full,v4-tq3 --decode 4 --repeats 1``
gave dynamic 1.17x, full 1.24x and v4-tq3 1.36x the floor on an idle core: each kvslim recipe adds a fixed cost
per layer call (storing, selecting, attending).

Prints a table, then one JSON line; writes ``results/decode.json``. Default: SmolLM2 at 1k/2k tokens with 8
decode steps (a few minutes on two busy cores). The issue's full configuration::

    python bench/decode.py --models smollm2-135m --lengths 2048,4096,8192
    python bench/decode.py --models gemma3-270m --lengths 8192,16384,32768
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DEFAULT_RECIPES = "full,stream,csa,hca,v4,v4-tq3,latent32"


_CLOCK = {"fn": time.process_time}


def _now() -> float:
    return _CLOCK["fn"]()


def _peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt_ids(tok, n: int) -> torch.Tensor:
    from kvslim.cache.methods.latent.calibration import _calibration_text

    text = _calibration_text(n * 6)
    ids = tok(text, return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"calibration text gave only {ids.shape[1]} tokens, need {n}")
    return ids


def _run_one(model, tok, ids, recipe: str, decode: int) -> dict:
    from transformers import DynamicCache

    from kvslim import cache_nbytes, make_cache

    _peak_reset()
    if recipe == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = make_cache(model, recipe, tokenizer=tok)
    with torch.inference_mode():
        t0 = _now()
        out = model(ids, cache=cache, logits_to_keep=1)
        prefill = _now() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode):
            t0 = _now()
            out = model(nxt, cache=cache)
            steps.append(_now() - t0)
            nxt = out.logits[:, -1:].argmax(-1)
    kv = cache_nbytes(cache)
    tiers = cache.tier_nbytes() if hasattr(cache, "tier_nbytes") else {}
    tiered = [layer for layer in cache.layers if hasattr(layer, "fetched_tokens")]
    context = ids.shape[1] + decode  # tokens the last decode step's query sees, itself included
    share = sum(layer.fetched_tokens for layer in tiered) / (len(tiered) * context) if tiered else 0.0
    if hasattr(cache, "close"):
        cache.close()  # a tiered cache's cold files
    return {"prefill_s": prefill, "decode_ms": 1000 * statistics.median(steps), "kv_bytes": kv, "peak_rss": _peak_rss(),
            "cold_bytes": tiers.get("cold", 0), "fetched_bytes_step": tiers.get("fetched", 0), "fetched_share": share}


def _bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Streaming read bandwidth in bytes/s: the best time of one ``sum`` over a ``gib`` GiB float32 tensor."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = _now()
        x.sum()
        best = min(best, _now() - t0)
    return x.numel() * 4 / best


def _weight_read_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once; an untied input embedding as one row."""
    params = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != emb.data_ptr():
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


def _kv_read_bytes(model, recipe: str, n: int, held: int) -> int:
    """KV bytes one decode step at ``n`` tokens reads: DynamicCache all it holds; kvslim the layers' prediction."""
    if recipe == "dynamic":
        return held
    from kvslim.cache.method import ModelShape
    from kvslim.cache.recipe import parse_recipe

    shape = ModelShape.from_model(model)
    specs = parse_recipe(recipe).layer_specs(list(shape.layer_types), shape.sliding_window)
    return sum(s.layer_class().predict(s, n, shape)["read"] for s in specs)


def _warm_up(model, tok) -> None:
    """One short stock and one short kvslim pass, so one-time costs (thread pools, lazy init) hit no row."""
    ids = _prompt_ids(tok, 64)
    for r in ("dynamic", "v4"):
        _run_one(model, tok, ids, r, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated embedded model names")
    ap.add_argument("--lengths", default="1024,2048", help="comma-separated context lengths (tokens)")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated recipes/presets (';' also separates)")
    ap.add_argument("--decode", type=int, default=8, help="decode steps per row (median ms/token reported)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians over rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine with --threads 1); wall: elapsed time")
    ap.add_argument("--out", default="results/decode.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "wall":
        _CLOCK["fn"] = time.perf_counter

    from kvslim.cache import full16_nbytes
    from kvslim.cache.recipe import parse_recipe
    from kvslim.models import load

    sep = ";" if ";" in args.recipes else ","
    recipes = ["dynamic"] + [r.strip() for r in args.recipes.split(sep) if r.strip()]
    for r in recipes[1:]:
        parse_recipe(r)
    rows = []
    bw = _bandwidth()
    print(f"streaming read bandwidth: {bw / 1e9:.2f} GB/s ({args.clock} clock, {torch.get_num_threads()} thread(s))")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, tok = load(name)
        _warm_up(model, tok)
        weights = _weight_read_bytes(model)
        for n in [int(x) for x in args.lengths.split(",")]:
            ids = _prompt_ids(tok, n)
            per: dict[str, list[dict]] = {r: [] for r in recipes}
            for rnd in range(args.repeats):
                order = recipes[rnd % len(recipes):] + recipes[: rnd % len(recipes)]
                for r in order:
                    per[r].append(_run_one(model, tok, ids, r, args.decode))
            full16 = full16_nbytes(model, n + args.decode)
            base = {k: statistics.median(x[k] for x in per["dynamic"]) for k in ("prefill_s", "decode_ms")}
            for r in recipes:
                med = {k: statistics.median(x[k] for x in per[r]) for k in ("prefill_s", "decode_ms")}
                read = weights + _kv_read_bytes(model, r, n + args.decode, per[r][-1]["kv_bytes"])
                floor_ms = 1000 * read / bw
                rows.append({
                    "model": name, "tokens": n, "recipe": r,
                    "prefill_s": round(med["prefill_s"], 3), "decode_ms": round(med["decode_ms"], 2),
                    "prefill_vs_dynamic": round(med["prefill_s"] / base["prefill_s"], 3),
                    "decode_speedup_vs_dynamic": round(base["decode_ms"] / med["decode_ms"], 3),
                    "kv_bytes": per[r][-1]["kv_bytes"], "kv_ratio_vs_full16": round(per[r][-1]["kv_bytes"] / full16, 4),
                    "peak_rss_mib": round(max(x["peak_rss"] for x in per[r]) / 2**20, 1),
                    "cold_bytes": per[r][-1]["cold_bytes"], "fetched_bytes_step": per[r][-1]["fetched_bytes_step"],
                    "fetched_share": round(per[r][-1]["fetched_share"], 4),
                    "read_mb": round(read / 1e6, 1), "floor_ms": round(floor_ms, 2),
                    "x_floor": round(med["decode_ms"] / floor_ms, 2),
                })
                print_row(rows[-1], header=len(rows) == 1)
        del model
    result = {"bench": "decode", "clock": args.clock, "decode_steps": args.decode, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "bandwidth_gbs": round(bw / 1e9, 2), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def print_row(r: dict, header: bool) -> None:
    cols = ["model", "tokens", "recipe", "prefill_s", "prefill_vs_dynamic", "decode_ms", "decode_speedup_vs_dynamic",
            "kv_bytes", "kv_ratio_vs_full16", "peak_rss_mib", "read_mb", "floor_ms", "x_floor"]
    widths = [13, 6, 22, 9, 8, 9, 8, 11, 8, 8, 8, 8, 7]
    short = ["model", "tokens", "recipe", "prefill_s", "pf_ratio", "decode_ms", "dec_x", "kv_bytes", "kv/f16", "rss_MiB",
             "read_MB", "floor_ms", "x_floor"]
    if header:
        print("  ".join(h.ljust(w) for h, w in zip(short, widths, strict=True)), flush=True)
    print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)), flush=True)


if __name__ == "__main__":
    main()
