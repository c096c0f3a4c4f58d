"""Task suites: several tasks over the same recipes and grid, one results folder per task under one suite folder.

``kvslim niah --suite ruler --out OUT`` runs every task of :data:`SUITES` ``["ruler"]`` (RULER's 13 tasks less its two
question-answering ones, which need external data sets) as an ordinary grid into ``OUT/<task>/`` (its own
``config.json`` and ``results.jsonl``, so resume, ``--force``, the Ray executor and ``kvslim report OUT/<task>``
work as for one task; the tasks run as one campaign, :mod:`kvslim.eval.harness.campaign`) and records the suite in
``OUT/suite.json``; ``kvslim report OUT`` then prints every task's table and the suite table
(:mod:`kvslim.eval.reports.suite_report`).

Tasks without a depth axis (cwe, fwe) would get one cell per seed and length; to give every task the same number
of cells they run ``len(depths)`` seeds per given seed (seed ``s`` becomes ``s * 1000 + i``, ``i < len(depths)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import InvalidInput
from ..tasks.base import get_task
from .campaign import Slice, run_campaign
from .runner import Grid

__all__ = ["SUITES", "SUITE_FILE", "suite_grids", "run_suite", "read_suite"]

SUITES: dict[str, tuple[str, ...]] = {
    "ruler": ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"),
    "reuse": ("multi-turn", "multi-request", "long-list", "long-copy"),  # issue 24: docs/reuse.md
}
SUITE_FILE = "suite.json"


def suite_grids(suite: str, *, model: str, recipes: list[str], lengths: list[int], depths: list[float],
                seeds: list[int], options: dict[str, Any] | None = None, tasks: list[str] | None = None) -> list[Grid]:
    """One grid per task of ``suite`` (or of ``tasks``, a subset of it); ``options`` go to every task that has them
    (``chat``, ``max_new_tokens``)."""
    if suite not in SUITES:
        raise InvalidInput(f"unknown suite {suite!r}: known suites are {', '.join(SUITES)}")
    names = list(SUITES[suite])
    if tasks:
        bad = [t for t in tasks if t not in names]
        if bad:
            raise InvalidInput(f"task {bad[0]!r} is not in the {suite} suite: its tasks are {', '.join(names)}")
        names = [t for t in names if t in tasks]
    grids = []
    for name in names:
        task = get_task(name)
        opts = {k: v for k, v in (options or {}).items() if k in task.options()}
        task_seeds = seeds if task.uses_depth else [s * 1000 + i for s in seeds for i in range(len(set(depths)))]
        grids.append(Grid(task=name, model=model, recipes=list(recipes), lengths=list(lengths), depths=list(depths),
                          seeds=task_seeds, options=opts))
    return grids


def read_suite(folder: str | Path) -> dict[str, Any] | None:
    """The suite record of a folder (``{"suite", "tasks"}``), or None if it is not a suite folder."""
    path = Path(folder) / SUITE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def run_suite(grids: list[Grid], out: str | Path, *, suite: str = "ruler", **run_kwargs: Any) -> dict[str, Any]:
    """Run each grid into ``out/<task>/``: a campaign of one slice per task (:func:`kvslim.eval.harness.campaign.
    run_campaign`, which loads the model once for every task; see :func:`kvslim.eval.harness.runner.run_grid` for
    ``run_kwargs``).

    Every grid is validated before the first one runs. Returns ``{"ran", "skipped", "total", "out", "tasks"}``.
    """
    from ...paths import check_output_dir

    folder = check_output_dir(out)
    for g in grids:
        g.validate(run_kwargs.get("factories"))
    old = read_suite(folder)
    tasks = list(dict.fromkeys([*(old["tasks"] if old else []), *(g.task for g in grids)]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUITE_FILE).write_text(json.dumps({"suite": suite, "tasks": tasks}, indent=1) + "\n")
    res = run_campaign([Slice(g, folder / g.task, label=g.task) for g in grids], **run_kwargs)
    return {"ran": res.ran, "skipped": res.skipped, "total": res.total, "out": str(folder),
            "tasks": {s.grid.task: r for s, r in res.done}}
