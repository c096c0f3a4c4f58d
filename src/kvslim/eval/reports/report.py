"""Turn a results folder into a table, a heatmap per recipe, a frontier plot and a Markdown summary.

Aggregates ``results.jsonl`` (see :mod:`kvslim.eval.harness.store`) per recipe and length: accuracy (mean success over depths
and seeds; for fidelity, which has no success, the mean KL), the mean graded score, the KV bytes held after prefill and
their ratio to a 16-bit full ``DynamicCache`` of the same prompt (``kv_bytes_full16``); for a tiered cache
(``recall``) ``kv_bytes`` is the hot tier and the table adds the cold tier (``cold_bytes``) and the bytes one decode
step fetched from it (``fetched_bytes``), as columns only when some recipe has them. Writes into the folder:

* ``heatmap-<recipe>.png``: depth (rows) x length (columns), colour = accuracy, the classic needle picture;
* ``frontier.png``: accuracy against (hot) KV bytes per token, one point per recipe;
* ``summary.md`` and ``summary.json``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from ...errors import InvalidInput
from ..harness.store import ResultStore
from .stats import fmt_ci, wilson

__all__ = ["Row", "Summary", "summarize", "build_report", "markdown_table", "table_rows", "summary_json"]


@dataclass
class Row:
    """One recipe's aggregate over the grid."""

    recipe: str
    acc: dict[int, float]  # length -> accuracy (or mean KL for fidelity)
    score: dict[int, float]  # length -> mean graded score
    kv_bytes: dict[int, float]  # length -> mean bytes held after prefill
    ratio16: dict[int, float]  # length -> kv_bytes / 16-bit full cache bytes
    bytes_per_token: float  # mean over all cells
    mean_acc: float
    cells: int
    ppl: float | None = None  # fidelity: mean perplexity over all cells
    grid: dict[tuple[float, int], float] = field(default_factory=dict)  # (depth, length) -> accuracy
    n: dict[int, int] = field(default_factory=dict)  # length -> cells (the n of each accuracy's interval)
    cold: dict[int, float] = field(default_factory=dict)  # length -> mean cold-tier bytes (tiered caches only)
    fetched: dict[int, float] = field(default_factory=dict)  # length -> mean bytes one decode step fetched


@dataclass
class Summary:
    task: str
    model: str
    metric: str  # "accuracy" or "mean KL (nats)"
    lengths: list[int]
    depths: list[float]
    rows: list[Row]


def _metric(rec: dict[str, Any]) -> float:
    s = rec.get("success")
    return float(rec["score"]) if s is None else float(bool(s))


def _means(at: dict[int, list[dict[str, Any]]], key: str) -> dict[int, float]:
    """Per length, the mean of ``key`` over the records that have it (records written before it existed lack it)."""
    out = {n: [r[key] for r in v if r.get(key) is not None] for n, v in at.items()}
    return {n: fmean(v) for n, v in out.items() if v}


def summarize(records: list[dict[str, Any]]) -> list[Summary]:
    """Aggregate records per (task, model), rows per recipe (``full`` first, then in order of appearance)."""
    by_run: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_run[(r["task"], r["model"])].append(r)
    out = []
    for (task, model), recs in by_run.items():
        recipes = sorted(dict.fromkeys(r["recipe"] for r in recs), key=lambda n: n != "full")
        lengths = sorted({int(r["length"]) for r in recs})
        depths = sorted({float(r["depth"]) for r in recs})
        has_success = any(r.get("success") is not None for r in recs)
        rows = []
        for name in recipes:
            mine = [r for r in recs if r["recipe"] == name]
            at = {n: [r for r in mine if int(r["length"]) == n] for n in lengths}
            at = {n: v for n, v in at.items() if v}
            grid: dict[tuple[float, int], list[float]] = defaultdict(list)
            for r in mine:
                grid[(float(r["depth"]), int(r["length"]))].append(_metric(r))
            rows.append(Row(
                recipe=name,
                acc={n: fmean(_metric(r) for r in v) for n, v in at.items()},
                score={n: fmean(float(r["score"]) for r in v) for n, v in at.items()},
                kv_bytes={n: fmean(r["kv_bytes"] for r in v) for n, v in at.items()},
                ratio16={n: fmean(r["kv_bytes"] / r["kv_bytes_full16"] for r in v if r.get("kv_bytes_full16")) for n, v in at.items()
                         if any(r.get("kv_bytes_full16") for r in v)},
                bytes_per_token=fmean(r["kv_bytes"] / r["prompt_tokens"] for r in mine),
                mean_acc=fmean(_metric(r) for r in mine),
                cells=len(mine),
                ppl=fmean(r["ppl"] for r in mine) if all(r.get("ppl") is not None for r in mine) else None,
                grid={k: fmean(v) for k, v in grid.items()},
                n={k: len(v) for k, v in at.items()},
                cold=_means(at, "cold_bytes"),
                fetched=_means(at, "fetched_bytes"),
            ))
        out.append(Summary(task, model, "accuracy" if has_success else "mean KL (nats)", lengths, depths, rows))
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table_rows(s: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table (accuracy per length, mean, KV bytes and ratio at the longest length)."""
    top = s.lengths[-1]
    acc = "acc" if s.metric == "accuracy" else "KL"
    ppl = any(r.ppl is not None for r in s.rows)
    tiers = [k for k in ("cold", "fetched") if any(getattr(r, k).get(top) for r in s.rows)]
    head = ["recipe", *[f"{acc}@{n}" for n in s.lengths], f"mean {acc}", "ppl" if ppl else "score", f"KV bytes@{top}",
            "vs fp16 full", "B/token", *[f"{_TIER_HEAD[k]}@{top}" for k in tiers]]
    body = []
    for r in s.rows:
        full16 = r.kv_bytes[top] / r.ratio16[top] if r.ratio16.get(top) else None
        if s.metric == "accuracy":  # every accuracy with its 95 % Wilson interval and cell count
            at = [fmt_ci(r.acc[n], r.n.get(n, 0)) if n in r.acc else "-" for n in s.lengths]
            mean = fmt_ci(r.mean_acc, r.cells)
        else:
            at = [f"{r.acc[n]:.4f}" if n in r.acc else "-" for n in s.lengths]
            mean = f"{r.mean_acc:.4f}"
        body.append([
            r.recipe,
            *at,
            mean,
            (f"{r.ppl:.3f}" if r.ppl is not None else "-") if ppl else f"{fmean(r.score.values()):.2f}",
            _fmt_bytes(r.kv_bytes[top]) if top in r.kv_bytes else "-",
            f"{r.ratio16[top]:.3f}x" if top in r.ratio16 else "-",
            f"{r.bytes_per_token:.0f}",
            *[_tier_cell(getattr(r, k).get(top), full16) for k in tiers],
        ])
    return head, body


_TIER_HEAD = {"cold": "cold bytes", "fetched": "fetched/step"}


def _tier_cell(v: float | None, full16: float | None) -> str:
    """A cold-tier figure with its ratio to the 16-bit full cache: ``44.0 MiB (0.95x)``; ``-`` where absent."""
    if v is None:
        return "-"
    return _fmt_bytes(v) + (f" ({v / full16:.3f}x)" if full16 else "")


def markdown_table(s: Summary) -> str:
    head, body = table_rows(s)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "recipe"


def _heatmap(s: Summary, row: Row, path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.full((len(s.depths), len(s.lengths)), np.nan)
    for (d, n), v in row.grid.items():
        data[s.depths.index(d), s.lengths.index(n)] = v
    fig = Figure(figsize=(1.2 + 0.9 * len(s.lengths), 1.2 + 0.45 * len(s.depths)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    acc = s.metric == "accuracy"
    im = ax.imshow(data, cmap="RdYlGn" if acc else "viridis_r", vmin=0 if acc else None, vmax=1 if acc else None,
                   aspect="auto", origin="upper")
    ax.set_xticks(range(len(s.lengths)), [str(n) for n in s.lengths])
    ax.set_yticks(range(len(s.depths)), [f"{d:.0%}" for d in s.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}" if acc else f"{data[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{s.task} / {s.model} / {row.recipe}", fontsize=9)
    fig.colorbar(im, ax=ax, label=s.metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _frontier(s: Summary, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(sorted(s.rows, key=lambda r: r.bytes_per_token)):
        if s.metric == "accuracy":  # 95 % Wilson interval of the accuracy over the row's cells
            lo, hi = wilson(r.mean_acc, r.cells)
            ax.errorbar([r.bytes_per_token], [r.mean_acc], yerr=[[r.mean_acc - lo], [hi - r.mean_acc]], fmt="o",
                        ms=6, capsize=3)
        else:
            ax.scatter([r.bytes_per_token], [r.mean_acc], s=40)
        # stagger labels vertically so neighbours at similar bytes stay readable
        label = r.recipe + (" (+cold tier)" if any(r.cold.values()) else "")
        ax.annotate(label, (r.bytes_per_token, r.mean_acc), textcoords="offset points", xytext=(4, 5 + 11 * (i % 3)),
                    fontsize=8)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("KV bytes held per prompt token (after prefill; hot tier)")
    ax.set_ylabel(s.metric)
    ax.set_title(f"{s.task} / {s.model}: memory vs {s.metric}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_report(out: str | Path, images: bool = True) -> dict[str, Any]:
    """Summarise ``<out>/results.jsonl``; write heatmaps, the frontier, ``summary.md`` and ``summary.json``.

    Bad lines of the store are skipped and duplicate cells counted once (the first record wins); both are listed in
    ``warnings`` and in ``summary.md``. Every output file is checked (writable, not a folder) before any is written.

    Returns ``{"summaries": [Summary...], "files": [paths written], "warnings": [lines]}``.
    """
    from ...paths import check_output_file
    from ..harness.caches import stored_recipe_key

    if not str(out).strip():
        raise InvalidInput("the results folder is empty: give the folder written by `kvslim niah --out`")
    folder = Path(out)
    store = ResultStore(folder, recipe_key=stored_recipe_key)
    if not store.results.is_file():
        raise InvalidInput(f"{folder} holds no results.jsonl: run `kvslim niah ... --out {folder}` first")
    found = store.read()
    warnings = found.messages(store.results)
    if not found.records:
        bad = f" ({len(found.bad)} unreadable lines)" if found.bad else ""
        raise InvalidInput(f"{store.results} holds no finished cells yet{bad}")
    summaries = summarize(found.records)
    plan: list[tuple[Path, Any]] = []  # (path, writer) for every image, decided before anything is written
    md = ["# Needle-in-a-haystack results", ""]
    for s in summaries:
        prefix = "" if len(summaries) == 1 else f"{_slug(s.task)}-{_slug(s.model)}-"
        md += [f"## {s.task} on {s.model}", "", f"Metric: {s.metric}; depths {', '.join(f'{d:g}' for d in s.depths)}; "
               f"KV bytes are held after prefill (a tiered cache's hot tier; its cold tier and one decode step's fetch "
               f"beside it), ratio against a 16-bit full cache of the same prompt; accuracies "
               f"carry their 95 % Wilson interval and cell count n.", "",
               markdown_table(s), ""]
        if images:
            for r in s.rows:
                p = folder / f"{prefix}heatmap-{_slug(r.recipe)}.png"
                plan.append((p, lambda p, s=s, r=r: _heatmap(s, r, p)))
                md.append(f"![{r.recipe}]({p.name})")
            p = folder / f"{prefix}frontier.png"
            plan.append((p, lambda p, s=s: _frontier(s, p)))
            md += ["", f"![frontier]({p.name})", ""]
    if warnings:
        md += ["## Skipped while reading", "", *[f"- {w}" for w in warnings], ""]
    texts = [folder / "summary.md", folder / "summary.json"]
    for p in [p for p, _ in plan] + texts:
        check_output_file(p, "report output")
    files: list[str] = []
    for p, write in plan:
        write(p)
        files.append(str(p))
    texts[0].write_text("\n".join(md) + "\n", encoding="utf-8")
    texts[1].write_text(json.dumps([summary_json(s) for s in summaries], indent=1) + "\n")
    files += [str(p) for p in texts]
    return {"summaries": summaries, "files": files, "warnings": warnings}


def summary_json(s: Summary) -> dict[str, Any]:
    return {
        "task": s.task, "model": s.model, "metric": s.metric, "lengths": s.lengths, "depths": s.depths,
        "rows": [{"recipe": r.recipe, "acc": r.acc, "mean_acc": r.mean_acc, "score": r.score, "kv_bytes": r.kv_bytes,
                  "ratio16": r.ratio16, "bytes_per_token": r.bytes_per_token, "cells": r.cells, "ppl": r.ppl,
                  "cold_bytes": r.cold, "fetched_bytes": r.fetched,
                  **_intervals(s, r)} for r in s.rows],
    }


def _intervals(s: Summary, r: Row) -> dict[str, Any]:
    """Cell counts and 95 % Wilson intervals of a row's accuracies (none for fidelity's KL)."""
    if s.metric != "accuracy":
        return {"n": r.n}
    return {"n": r.n, "acc_ci": {n: list(wilson(v, r.n.get(n, 0))) for n, v in r.acc.items()},
            "mean_acc_ci": list(wilson(r.mean_acc, r.cells))}
