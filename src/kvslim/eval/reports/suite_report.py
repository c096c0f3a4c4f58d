"""The suite table (a RULER-style average over tasks) and the paired comparison of two recipes.

* :func:`suite_tables`: per (model, recipe), one row per task and one ``average`` row, one column per length and an
  ``all`` column. A cell is the RULER score -- the mean over its cells of ``retrieved`` (the fraction of expected
  strings in the answer; ``success`` for records without it) -- with its 95 % Wilson interval and cell count. The
  average is RULER's: the unweighted mean of the task scores (its interval: Wilson at the pooled cell count, which
  is wider than the average's own when tasks differ, never narrower by much).
* :func:`compare`: recipes A and B on the prompts both ran (same task, model, length, depth, seed and prompt hash),
  per task and pooled; an exact sign test (McNemar's, for 0/1 scores) on the prompts where they disagree.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Any

from ...errors import InvalidInput
from ..harness.store import ResultStore
from ..harness.suite import read_suite
from .stats import Paired, fmt_ci, paired, wilson

__all__ = ["ruler_score", "suite_records", "suite_tables", "compare", "tables_markdown"]


def ruler_score(rec: dict[str, Any]) -> float | None:
    """A record's RULER score in [0, 1] (``retrieved``, else ``success``), or None for score-only tasks."""
    if rec.get("retrieved") is not None:
        return float(rec["retrieved"])
    if rec.get("success") is not None:
        return float(bool(rec["success"]))
    return None


def suite_records(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{task: records}`` of a suite folder (tasks in the suite's order), or of one task's folder; recipes under
    their canonical names (:func:`kvslim.eval.harness.caches.stored_recipe_key`), as the reports show them."""
    from ..harness.caches import stored_recipe_key

    folder = Path(folder)
    suite = read_suite(folder)
    if suite is None:
        recs = ResultStore(folder, recipe_key=stored_recipe_key).records()
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            out[r["task"]].append(r)
        return dict(out)
    return {t: ResultStore(folder / t, recipe_key=stored_recipe_key).records() for t in suite["tasks"]
            if (folder / t / "results.jsonl").is_file()}


def _cell(scores: list[float]) -> dict[str, Any]:
    p = fmean(scores)
    return {"score": p, "n": len(scores), "ci": list(wilson(p, len(scores)))}


def suite_tables(by_task: dict[str, list[dict[str, Any]]], tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """One table per (model, recipe): ``{"model", "recipe", "lengths", "rows": {task | "average": {length | "all":
    {"score", "n", "ci"}}}}``. The average of a column needs every task (of ``tasks``, default those present)."""
    required = list(tasks or [])
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for task, recs in by_task.items():
        for r in recs:
            if ruler_score(r) is not None:
                groups[(r["model"], r["recipe"])][task].append(r)
    tables = []
    for (model, recipe), mine in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][1])):
        lengths = sorted({int(r["length"]) for recs in mine.values() for r in recs})
        rows: dict[str, dict[Any, dict[str, Any]]] = {}
        for task in [t for t in by_task if t in mine]:
            recs = mine[task]
            row = {n: _cell([ruler_score(r) for r in recs if int(r["length"]) == n]) for n in lengths
                   if any(int(r["length"]) == n for r in recs)}
            row["all"] = _cell([ruler_score(r) for r in recs])
            rows[task] = row
        avg: dict[Any, dict[str, Any]] = {}
        for col in [*lengths, "all"]:
            have = [rows[t][col] for t in rows if col in rows[t]]
            if len(have) == len(rows) and all(t in rows for t in required):  # over every task, or none
                p = fmean(c["score"] for c in have)
                n = sum(c["n"] for c in have)
                avg[col] = {"score": p, "n": n, "ci": list(wilson(p, n))}
        rows["average"] = avg
        tables.append({"model": model, "recipe": recipe, "lengths": lengths, "rows": rows})
    return tables


def tables_markdown(tables: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``[(title, markdown table)]`` for :func:`suite_tables`' output."""
    out = []
    for t in tables:
        cols = [*t["lengths"], "all"]
        head = ["task", *[f"@{c}" if c != "all" else "all lengths" for c in cols]]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for task, row in t["rows"].items():
            cells = [fmt_ci(row[c]["score"], row[c]["n"]) if c in row else "-" for c in cols]
            name = "**average**" if task == "average" else task
            lines.append("| " + " | ".join([name, *cells]) + " |")
        out.append((f"RULER score of {t['recipe']} on {t['model']}", "\n".join(lines)))
    return out


def compare(by_task: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[tuple[str, Paired]]:
    """``[(task or "all tasks", Paired)]`` for recipes ``a`` and ``b`` on the prompts both have. ``a`` and ``b`` may
    be any spelling of a recipe (``full-kivi2``, ``stream``): they are compared under their canonical names, as the
    records are stored; two spellings of one recipe are refused."""
    from ..harness.caches import given_recipe_key

    given = (a, b)
    a, b = given_recipe_key(a.strip()), given_recipe_key(b.strip())
    if a == b:
        same = a if given[0] == given[1] else f"{a} ({given[0]} and {given[1]} are one recipe)"
        raise InvalidInput(f"--compare needs two different recipes, got {same} twice: a recipe against itself tests "
                           "nothing")
    seen = {r["recipe"] for recs in by_task.values() for r in recs}
    for name, raw in zip((a, b), given, strict=True):
        if name not in seen:
            also = f" (canonical {name})" if name != raw else ""
            raise InvalidInput(f"recipe {raw!r}{also} has no cells here: recipes present are "
                               f"{', '.join(sorted(seen)) or 'none (no finished cells)'}")
    pooled_a: dict[tuple, float] = {}
    pooled_b: dict[tuple, float] = {}
    out = []
    for task, recs in by_task.items():
        cells: dict[str, dict[tuple, float]] = {a: {}, b: {}}
        for r in recs:
            s = ruler_score(r)
            if r["recipe"] in cells and s is not None:
                key = (r["task"], r["model"], int(r["length"]), round(float(r["depth"]), 6), int(r["seed"]),
                       r.get("prompt_hash"))
                cells[r["recipe"]][key] = s
        if cells[a] and cells[b]:
            out.append((task, paired(a, b, cells[a], cells[b])))
            pooled_a.update(cells[a])
            pooled_b.update(cells[b])
    if len(out) > 1:
        out.append(("all tasks", paired(a, b, pooled_a, pooled_b)))
    if not out or all(p.n == 0 for _, p in out):
        raise InvalidInput(f"{a} and {b} share no prompts here: run both on the same grid first")
    return out


def build_suite_report(folder: str | Path, images: bool = True) -> dict[str, Any]:
    """Every task's report (:func:`kvslim.eval.reports.report.build_report` in ``folder/<task>``) plus the suite tables in
    ``folder/summary.md`` and ``folder/summary.json``. Returns ``{"summaries", "tables", "files", "warnings"}``."""
    import json

    from .report import build_report, markdown_table, summary_json

    folder = Path(folder)
    suite = read_suite(folder)
    if suite is None:
        raise InvalidInput(f"{folder} is not a suite folder (no suite.json): run `kvslim niah --suite ...` first")
    summaries, files, warnings = [], [], []
    for task in suite["tasks"]:
        sub = folder / task
        if not (sub / "results.jsonl").is_file() or not ResultStore(sub).records():
            continue
        res = build_report(sub, images=images)
        summaries += res["summaries"]
        files += res["files"]
        warnings += [f"{task}: {w}" for w in res.get("warnings", [])]
    if not summaries:
        raise InvalidInput(f"{folder} holds no finished cells yet")
    tables = suite_tables(suite_records(folder))
    md = [f"# {suite['suite']} suite", "", "RULER score: mean string-match recall (fraction of the expected answers in "
          "the greedy answer), 95 % Wilson interval, n = cells; the average is the unweighted mean over tasks.", ""]
    for title, table in tables_markdown(tables):
        md += [f"## {title}", "", table, ""]
    md += ["## Per task (accuracy: every expected answer found)", ""]
    for s in summaries:
        md += [f"### {s.task} on {s.model}", "", markdown_table(s), ""]
    (folder / "summary.md").write_text("\n".join(md) + "\n")
    (folder / "summary.json").write_text(json.dumps({"suite": suite["suite"], "tables": tables,
                                                     "tasks": [summary_json(s) for s in summaries]}, indent=1) + "\n")
    files += [str(folder / "summary.md"), str(folder / "summary.json")]
    return {"summaries": summaries, "tables": tables, "files": files, "warnings": warnings}
