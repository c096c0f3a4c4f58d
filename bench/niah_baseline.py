"""The measured needle-in-a-haystack baseline: accuracy and KV bytes of kvslim's recipes beside the field's eviction
methods and kvslim's quantization-only points, on the real models.

Runs, for each model, length and task (passkey, natural-text needle), a grid over ``full``, every preset of
``kvslim.cache.recipe.PRESETS``, the quantization-only points (``full+tq4``, ``full+tq3``, ``full+kivi4``,
``full+fp8``), the eviction baselines (StreamingLLM, SnapKV, TOVA, H2O, key-norm, Expected Attention at keep
ratios 1/2, 1/4, 1/8) and a few eviction + codec compositions, at the given depths and seeds, into resumable
stores under ``results/niah-baseline/<model>/<task>/`` (rerunning skips finished cells). The context is compressed
before the question is seen (question-agnostic, as a server caching a shared document must; ``--aware`` runs the
question-aware variant into ``<task>-aware/``). The grid runs as one campaign (:mod:`kvslim.eval.harness.campaign`):
work goes cheapest first (by length), and ``--budget-min`` stops starting new cells after that many minutes, so a
slow machine yields a complete small grid and a list of what is missing rather than nothing. A prompt's eviction recipes share one context prefill (the first one's forward pass,
recorded and fed to the others with every layer's output checked equal bit for bit, :mod:`kvslim.eval.harness.share`; the
records say ``shared_prefill``; ``--no-share-prefill`` runs each through the model). On models with sliding-window
layers (Gemma 3; read from the model's config) the chunk-invariant recipes prefill in calls of 512 tokens (``--prefill-chunk``; the records say ``prefill_chunk``). Then writes ``docs/baseline.md`` (tables + frontier plots in ``docs/img/``),
``results/niah_baseline.json``, prints the tables and one final JSON line.

    python bench/niah_baseline.py                      # the issue's grid: SmolLM2 1k/2k/4k, Gemma 3 1k/4k/8k
    python bench/niah_baseline.py --budget-min 40      # stop starting cells after 40 minutes
    python bench/niah_baseline.py --report-only        # rebuild docs/baseline.md from the stores
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import statistics
from pathlib import Path

GRID = {"smollm2-135m": [1000, 2000, 4000], "gemma3-270m": [1000, 4000, 8000]}
TASKS = ("passkey", "needle")
DEPTHS = "0,0.25,0.5,0.75,1"
QUANT_ONLY = ("full+tq4", "full+tq3", "full+kivi4", "full+fp8")
KEEP = ("0.5", "0.25", "0.125")
COMPOSED = ("tova:keep=0.5+tq4", "tova:keep=0.25+tq4", "knorm:keep=0.5+kivi2", "snapkv:keep=0.5+fp8")
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def eviction() -> tuple[str, ...]:
    """The field's eviction methods, in registry order: the registered methods of the ``evict`` family."""
    from kvslim.cache.method import methods

    return tuple(name for name, m in methods().items() if m.family == "evict")


@functools.cache
def sliding(model: str) -> bool:
    """Whether ``model`` has sliding-window layers (its config's facts): chunked prefill is cheaper there."""
    from kvslim.models import embedded_facts

    return embedded_facts(model).has_sliding


def presets() -> list[str]:
    """kvslim's presets, the quantization-only points, every baseline at every keep ratio, the compositions."""
    from kvslim.cache.recipe import PRESETS, canonical

    quant = {canonical(q) for q in QUANT_ONLY}
    named = [p for p in PRESETS if canonical(p) not in quant]  # full-tq4 is full+tq4: one row
    return [*named, *QUANT_ONLY, *(f"{m}:keep={r}" for r in KEEP for m in eviction()), *COMPOSED]


@functools.cache
def row_name(recipe: str) -> str:
    """The one name a recipe's row goes under: its preset's name where it is a preset, else its canonical form."""
    from kvslim.cache.recipe import PRESETS, canonical

    quant = {canonical(q) for q in QUANT_ONLY}  # full+tq4 keeps that spelling, not the preset full-tq4
    names = {canonical(p): p for p in PRESETS if canonical(p) not in quant}
    return "full" if recipe == "full" else names.get(canonical(recipe), canonical(recipe))


def records(model: str, task: str, aware: bool) -> list[dict]:
    """The store's records, each recipe under one name: a preset's name where the recipe is a preset (stores written
    before records held canonical names say ``stream``, later ones ``window``: one row either way)."""
    from kvslim.eval.harness.store import ResultStore

    recs = ResultStore(folder(model, task, aware)).records()
    for r in recs:
        r["recipe"] = row_name(r["recipe"])
    return recs


def folder(model: str, task: str, aware: bool) -> Path:
    return ROOT / "results" / "niah-baseline" / model / (task + ("-aware" if aware else ""))


def slices(args: argparse.Namespace) -> list:
    """The campaign: one slice per (length, model, task), cheapest first (by length, then model, then task); on
    models with sliding-window layers the chunk-invariant recipes prefill in ``--prefill-chunk`` calls."""
    from kvslim.eval.harness.campaign import Slice
    from kvslim.eval.harness.runner import Grid

    plan = sorted(((n, m, t) for m in args.models for n in GRID[m] for t in args.tasks if n in args.lengths_of(m)),
                  key=lambda x: (x[0], list(GRID).index(x[1]), x[2]))
    return [Slice(Grid(task=task, model=model, recipes=args.recipes, lengths=[length], depths=args.depths,
                       seeds=args.seeds, options={"agnostic": not args.aware}),
                  folder(model, task, args.aware), run={"prefill_chunk": args.prefill_chunk if sliding(model) else 0})
            for length, model, task in plan]


def run(args: argparse.Namespace) -> None:
    from kvslim.eval.harness.campaign import run_campaign

    run_campaign(slices(args), budget_s=args.budget_min * 60, say=functools.partial(print, flush=True),
                 threads=args.threads, progress=not args.quiet, share_prefill=not args.no_share_prefill,
                 chunk_where_invariant=True)


def family(recipe: str) -> str:
    """``baseline`` (the field's eviction methods), ``quant`` (full + a codec) or ``kvslim`` (kvslim's structures)."""
    head = recipe.partition("+")[0].partition(":")[0]
    if head in eviction():
        return "baseline"
    return "reference" if recipe == "full" else "quant" if head == "full" else "kvslim"


def frontier_lines(recs: list[dict]) -> list[str]:
    """The memory/accuracy frontier in words, computed from the records, per prompt length (only recipes with cells
    at that length): the recipes no other recipe beats (at most the bytes per token and at least the accuracy, one
    of them strictly), and for each baseline the cheapest kvslim recipe (structure or quant-only) at least as
    accurate, if any."""
    out = []
    for n in sorted({r["length"] for r in recs}):
        at: dict[str, list[dict]] = {}
        for r in recs:
            if r["length"] == n:
                at.setdefault(r["recipe"], []).append(r)
        pts = {k: (sum(r["kv_bytes"] for r in v) / sum(r["prompt_tokens"] for r in v),
                   sum(bool(r["success"]) for r in v) / len(v), len(v)) for k, v in at.items()}

        def beats(a: str, b: str, pts: dict = pts) -> bool:
            (ba, aa, _), (bb, ab, _) = pts[a], pts[b]
            return ba <= bb and aa >= ab and (ba < bb or aa > ab)

        def desc(k: str, pts: dict = pts) -> str:
            b, a, c = pts[k]
            return f"`{k}` ({b:.0f} B/token, acc {a:.2f} over {c})"

        front = sorted((k for k in pts if not any(beats(o, k) for o in pts)), key=lambda k: pts[k][0])
        out += [f"At {n} tokens. Frontier (no recipe has fewer bytes per token and at least the accuracy): "
                + ", ".join(f"{desc(k)} [{family(k)}]" for k in front) + ".", ""]
        ours = [k for k in pts if family(k) in ("kvslim", "quant")]
        tiered = {k for k in ours if any(r.get("cold_bytes") for r in at[k])}  # exact tokens moved to a cold tier
        out.append("Bytes per token above are the fast-memory tier; "
                   + (", ".join(f"`{k}`" for k in sorted(tiered)) + (" also holds" if len(tiered) == 1 else
                      " also hold") + " a cold tier (its column in the table), so for each baseline the cheapest "
                      "one-tier kvslim recipe is named too." if tiered
                      else "no recipe here has a cold tier."))
        out.append("")
        for b in sorted(k for k in pts if family(k) == "baseline"):
            win = [k for k in ours if pts[k][1] >= pts[b][1] and pts[k][0] <= pts[b][0]]
            one = [k for k in win if k not in tiered]
            line = f"- {desc(b)}: "
            if win:
                best = min(win, key=lambda k: pts[k][0])
                line += f"matched or beaten by {desc(best)}"
                if best in tiered:
                    line += (f"; in one tier by {desc(min(one, key=lambda k: pts[k][0]))}" if one
                             else "; by no one-tier kvslim recipe")
            else:
                line += "no kvslim recipe is as accurate at as few bytes"
            out.append(line)
        out.append("")
    return out


def write_docs(args: argparse.Namespace) -> dict:
    from kvslim.eval.reports.report import _frontier, markdown_table, summarize

    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    recipes = ["full", *[r for r in args.recipes if r != "full"]]
    md = [
        "# Needle-in-a-haystack baseline",
        "",
        "Generated by `python bench/niah_baseline.py` (" + dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        + f", {platform.machine()}, torch threads {args.threads or 'default'}). Do not edit by hand.",
        "",
        *([args.note, ""] if args.note else []),
        "Recipes: `full` (transformers' `DynamicCache`, float32), kvslim's presets (`kvslim recipes`), its",
        "quantization-only points (`full+CODEC`), the eviction baselines of `kvslim.cache.methods` (`streaming`:",
        "StreamingLLM, `snapkv`, `tova`, `h2o`, `knorm`: key-norm, `expattn`: Expected Attention; `keep=r` keeps a",
        "fraction r of the tokens per layer and KV head, evicted tokens are deleted) and eviction + codec compositions: "
        + ", ".join(f"`{r}`" for r in recipes[1:]) + f". Depths {args.depths}, seeds {args.seeds}; greedy answers"
        + f" (so each `acc@N` is over {len(args.depths) * len(args.seeds)} cell(s)).",
        "Question-agnostic sections prefill the context alone, then the question (a compressing cache never sees the",
        "question); question-aware sections prefill the whole prompt at once. kvslim's structural recipes compress by",
        "token position only, so for them the two are the same.",
        "`acc@N`: fraction of cells whose greedy answer contains the needle's answer at prompt length N tokens;",
        "`score`: mean teacher-forced log-probability (nats) of the answer tokens; KV bytes: measured bytes the cache",
        "holds after prefill (`kvslim.memory.cache_nbytes`) at the longest length; `vs fp16 full`: that over a 16-bit",
        "stock `DynamicCache` of the same prompt (the float32 `full` row is 2x); `B/token`: bytes per prompt token.",
        "",
    ]
    out_json: dict = {"grid": {m: GRID[m] for m in args.models}, "depths": args.depths, "seeds": args.seeds, "runs": []}
    missing: list[str] = []
    seconds = 0.0
    n_cells = n_shared = n_chunked = 0
    fed: dict[tuple[str, int], tuple[list[float], list[float]]] = {}  # (model, length) -> (fed, own forward) seconds
    wanted = {row_name(r) for r in recipes}
    others: dict[str, int] = {}  # cells of recipes the stores hold but this report leaves out
    for model in args.models:
        for task, aware in [(t, a) for t in TASKS for a in (False, True)]:
            recs = records(model, task, aware)
            for r in recs:
                if r["recipe"] not in wanted:
                    others[r["recipe"]] = others.get(r["recipe"], 0) + 1
            recs = [r for r in recs if r["recipe"] in wanted]
            seconds += sum(r.get("seconds", 0) for r in recs)
            n_cells += len(recs)
            n_shared += sum(bool(r.get("shared_prefill")) for r in recs)
            n_chunked += sum(bool(r.get("prefill_chunk")) for r in recs)
            for r in recs:
                if family(r["recipe"]) == "baseline" and "+" not in r["recipe"]:
                    fed.setdefault((model, r["length"]), ([], []))[0 if r.get("shared_prefill") else 1].append(r["seconds"])
            if aware and not recs:
                continue  # the question-aware variant is optional (--aware)
            mode = "question-aware" if aware else "question-agnostic"
            done = {(r["recipe"], r["length"], r["depth"], r["seed"]) for r in recs}
            for n in GRID[model] if not aware else []:
                gone = [r for r in recipes if any((r, n, d, s) not in done for d in args.depths for s in args.seeds)]
                cells = sum((r, n, d, s) not in done for r in recipes for d in args.depths for s in args.seeds)
                if gone:
                    total = len(recipes) * len(args.depths) * len(args.seeds)
                    missing.append(f"{model} {task} at {n} tokens: {cells} of {total} cells, of "
                                   + (", ".join(gone) if len(gone) < len(recipes) else "every recipe"))
            md += [f"## {task} on {model} ({mode})", ""]
            if not recs:
                md += ["Not run yet.", ""]
                continue
            (s,) = summarize(recs)
            cells: dict[str, int] = {}
            for r in recs:
                cells[r["recipe"]] = cells.get(r["recipe"], 0) + 1
            md += [markdown_table(s), "", "Cells per recipe: " + ", ".join(f"`{k}` {v}" for k, v in cells.items()) + ".", ""]
            md += frontier_lines(recs)
            png = img / f"niah-frontier-{model}-{task}{'-aware' if aware else ''}.png"
            _frontier(s, png)
            md += [f"![{task} frontier on {model}, {mode}](img/{png.name})", ""]
            print(f"\n{task} on {model} ({mode})\n{markdown_table(s)}")
            out_json["runs"].append({"model": model, "task": task, "aware": aware, "rows": [
                {"recipe": r.recipe, "acc": r.acc, "score": r.score, "kv_bytes": r.kv_bytes, "ratio16": r.ratio16,
                 "bytes_per_token": r.bytes_per_token, "cells": cells.get(r.recipe, 0)} for r in s.rows]})
    if others:
        md += ["Cells the stores also hold, of recipes not in this report (`--recipes` to include them): "
               + ", ".join(f"`{k}` {v}" for k, v in sorted(others.items())) + ".", ""]
    md += ["## Missing", ""]
    md += [f"- {m}" for m in missing] if missing else ["Nothing: every planned cell ran."]
    if missing:
        md += ["", "Rerun the same command to fill the gaps (finished cells are skipped)."]
    md += ["", f"Time spent in cells (sum of the per-cell `seconds`, one torch thread on a shared 2-core machine): "
           f"{seconds / 60:.1f} min, over {n_cells} cells. Of those, {n_shared} eviction cells were fed their "
           "context from another eviction recipe's recorded prefill of the same prompt (`shared_prefill`, "
           "`kvslim.eval.harness.share`: the same cache as a forward pass, checked), and "
           f"{n_chunked} cells of chunk-invariant recipes prefilled in chunks (`prefill_chunk`: the same results to "
           "float rounding); the others ran one forward call per side of the question."]
    pairs = [(k, v) for k, v in sorted(fed.items()) if v[0] and v[1]]
    if pairs:
        md += ["", "Median `seconds` of an eviction cell (no codec), fed from a recorded prefill / with its own "
               "forward pass, same runs: " + "; ".join(
                   f"{m} at {n}: {statistics.median(a):.1f} s (n={len(a)}) / {statistics.median(b):.1f} s (n={len(b)})"
                   for (m, n), (a, b) in pairs) + "."]
    md += [""]
    (ROOT / "docs" / "baseline.md").write_text("\n".join(md))
    out_json["missing"] = missing
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "niah_baseline.json").write_text(json.dumps(out_json, indent=1) + "\n")
    return out_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(GRID), help="comma-separated: smollm2-135m,gemma3-270m")
    ap.add_argument("--max-length", type=int, default=0, help="skip lengths above this (0: the whole grid)")
    ap.add_argument("--recipes", default="", help="comma-separated (default: full, presets, quant-only, baselines)")
    ap.add_argument("--depths", default=DEPTHS, help=f"needle depths (default {DEPTHS})")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: passkey,needle")
    ap.add_argument("--aware", action="store_true", help="question-aware: prefill the whole prompt at once (into <task>-aware/)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-core box)")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="on Gemma 3 (sliding-window layers), feed chunk-invariant recipes' prompts in calls of this "
                         "many tokens (cheaper; the same results to float rounding, noted per record); eviction and "
                         "KIVI recipes always prefill each side of the question in one call (0: every recipe)")
    ap.add_argument("--no-share-prefill", action="store_true",
                    help="run every eviction recipe's context prefill through the model (default: one forward per prompt "
                         "fed to all of them, every layer's output checked equal; kvslim.eval.harness.share)")
    ap.add_argument("--budget-min", type=float, default=0, help="stop starting cells after this many minutes")
    ap.add_argument("--report-only", action="store_true", help="only rebuild docs/baseline.md from the stores")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--note", default="", help="a paragraph printed under the header (e.g. which code produced the cells)")
    args = ap.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in GRID]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}: choose from {', '.join(GRID)}")
    if args.prefill_chunk < 0:
        ap.error(f"--prefill-chunk must be 0 (one call) or a positive number of tokens, got {args.prefill_chunk}")
    args.recipes = ["full", *[r for r in (args.recipes.split(",") if args.recipes else presets()) if r and r != "full"]]
    args.depths = [float(d) for d in args.depths.split(",")]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lengths_of = lambda m: [n for n in GRID[m] if not args.max_length or n <= args.max_length]
    if not args.report_only:
        run(args)
    summary = write_docs(args)
    print(json.dumps({"bench": "niah_baseline", "missing": len(summary["missing"]),
                      "runs": [{"model": r["model"], "task": r["task"], "aware": r["aware"],
                                "acc": {x["recipe"]: x["acc"] for x in r["rows"]}} for r in summary["runs"]]}))


if __name__ == "__main__":
    main()
