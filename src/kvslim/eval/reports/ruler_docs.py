"""The Markdown of ``docs/ruler.md`` (``bench/ruler_baseline.py``): what the models score uncompressed, per task.

A task is called *informative* at a length when the uncompressed score's 95 % Wilson interval lies above 0.5 (a
compressed recipe has room to lose, and a loss of a few cells shows), *floor* when the score is at most 0.2 (the
model cannot do the task uncompressed: a recipe cannot be told apart from it), *weak* otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..harness.store import ResultStore
from ..harness.suite import SUITES
from .suite_report import suite_tables, tables_markdown

__all__ = ["verdict", "baseline_markdown", "throughput_markdown"]


def throughput_markdown(path: Path) -> list[str]:
    """The harness-throughput section from ``bench/harness_throughput.py``'s JSON (nothing if it has not run)."""
    import json

    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    chunked = any(r.get("prefill_chunk") for r in d["results"])
    lines = [f"## Harness throughput on {d['model']}: one by one vs {'chunked prefill' if chunked else 'batched'}", "",
             f"`python bench/harness_throughput.py` (written to `results/{path.name}`): {d['cells']} cells of "
             f"`{d['task']}` at {d['length']} tokens on {d['model']} (recipes `{d['recipes']}`), each configuration "
             f"run {d['rounds']} time(s), alternating, on the shared machine; median cells per minute, ratio to the "
             "first row, and whether every record (answer, success, retrieved, KV bytes) equals the first row's.", "",
             "| batch | threads | prefill chunk | cells/min | speed-up | records equal | max abs logprob diff |",
             "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        chunk = r.get("prefill_chunk") or "one call"
        lines.append(f"| {r['batch']} | {r['threads']} | {chunk} | {r['cells_per_min']:.2f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['records_equal'] else 'NO'} | {r['max_logprob_diff']:.1e} |")
    return [*lines, ""]


def prefill_lines(by_task: dict[str, list[dict[str, Any]]], lengths: list[int]) -> list[str]:
    """How the cells' prompts were prefilled, per length: one call, or ``--prefill-chunk`` chunks (the records'
    ``prefill_chunk``); nothing when every cell ran in one call."""
    counts: dict[int, dict[int, int]] = {}
    for recs in by_task.values():
        for r in recs:
            per = counts.setdefault(int(r["length"]), {})
            chunk = int(r.get("prefill_chunk") or 0)
            per[chunk] = per.get(chunk, 0) + 1
    if not any(c for per in counts.values() for c in per):
        return []
    parts = []
    for n in lengths:
        if n in counts:
            kinds = [f"{k} in one call" if c == 0 else f"{k} in {c}-token chunks" for c, k in sorted(counts[n].items())]
            parts.append(f"{n} tokens: {', '.join(kinds)}")
    return ["Prefill (cells; `--prefill-chunk` changes nothing but float rounding for `full`, see "
            "`bench/harness_throughput.py` below): " + "; ".join(parts) + ".", ""]


def verdict(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci"]
    return "informative" if lo > 0.5 else "floor" if cell["score"] <= 0.2 else "weak"


def baseline_markdown(store: Path, *, models: list[str], grid: dict[str, list[int]], depths: list[float],
                      seeds: list[int], recipes: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``(markdown lines, summary)`` of the stores under ``store/<model>/<task>/``."""
    tasks = list(SUITES["ruler"])
    per = len(depths) * len(seeds)
    md = [
        f"Uncompressed (`{'`, `'.join(recipes)}`) scores of the `ruler` suite (`kvslim niah --suite ruler`; tasks listed below). Each cell of a table is the RULER score -- the mean over cells of the fraction of "
        "expected answers found in the greedy answer (string match, RULER's `string_match_all`) -- with its 95 % "
        f"Wilson interval and cell count n: {len(depths)} depths x {len(seeds)} seed(s) per task and length "
        "(cwe and fwe have no depth: as many seeds instead). `average` is RULER's unweighted mean over the tasks (shown only where every task ran).",
        "",
        "Verdict per task and length: *informative* = the interval lies above 0.5 (a compressed recipe has room to "
        "lose and a loss shows), *floor* = the score is at most 0.2 (the model cannot do it uncompressed), *weak* "
        "otherwise.",
        "",
        "Tasks (Hsieh et al. 2024, RULER, less its two QA tasks; generated locally from the seed): `niah_single_1` "
        "(repeated filler, word key, 7-digit number), `niah_single_2` (Python's documentation as prose, number), "
        "`niah_single_3` (prose, UUID), `niah_multikey_1` (prose, 4 keys, 1 asked), `niah_multikey_2` (a haystack "
        "made only of needles with other keys), `niah_multikey_3` (the same with UUID keys and values), "
        "`niah_multivalue` (4 values of one key), `niah_multiquery` (4 keys asked at once), `vt` (a chain of 5 "
        "variable assignments, name every variable bound to the value), `cwe` (the 10 most common words of a "
        "numbered list), `fwe` (the 3 most frequent coded words of a Zipf-distributed text).",
        "",
    ]
    summary: dict[str, Any] = {"grid": {m: grid[m] for m in models}, "depths": depths, "seeds": seeds, "models": {},
                               "missing": []}
    seconds = 0.0
    for model in models:
        by_task = {t: ResultStore(store / model / t).records() for t in tasks}
        by_task = {t: [r for r in recs if r["recipe"] in recipes and int(r["length"]) in grid[model]]
                   for t, recs in by_task.items()}
        seconds += sum(r.get("seconds", 0) for recs in by_task.values() for r in recs)
        for t in tasks:
            for n in grid[model]:
                for rec in recipes:
                    have = sum(1 for r in by_task[t] if int(r["length"]) == n and r["recipe"] == rec)
                    if have < per:
                        summary["missing"].append(f"{model} {t} at {n} tokens ({rec}): {have} of {per} cells")
        tables = suite_tables({t: v for t, v in by_task.items() if v}, tasks=tasks)  # no average over a part
        md += [f"## {model}", ""]
        if not tables:
            md += ["Not run yet.", ""]
            continue
        summary["models"][model] = tables
        for title, table in tables_markdown(tables):
            md += [f"### {title}", "", table, ""]
        for t in tables:
            if t["recipe"] != "full":
                continue
            cols = t["lengths"]
            head = ["task", *[f"@{n}" for n in cols]]
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            for task, row in t["rows"].items():
                if task != "average":
                    lines.append("| " + " | ".join([task, *[verdict(row[n]) if n in row else "-" for n in cols]]) + " |")
            md += [f"### Which tasks are informative for compression on {model}", "", *lines, ""]
        md += prefill_lines(by_task, grid[model])
    for path in sorted(store.parent.glob("harness_throughput*.json")):
        md += throughput_markdown(path)
    md += ["## Missing", ""]
    md += [f"- {m}" for m in summary["missing"]] if summary["missing"] else ["Nothing: every planned cell ran."]
    md += ["", f"Time spent in cells (sum of the per-cell `seconds`): {seconds / 60:.1f} min.", ""]
    return md, summary
