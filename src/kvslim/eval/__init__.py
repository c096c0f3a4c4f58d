"""Needle-in-a-haystack evaluation of KV-cache recipes on real models (``kvslim niah`` / ``kvslim report``).

Tasks (one module each): :mod:`~kvslim.eval.tasks.passkey`, :mod:`~kvslim.eval.tasks.needle`, :mod:`~kvslim.eval.tasks.multi_needle`,
:mod:`~kvslim.eval.tasks.fidelity`, and the RULER-style suite (:mod:`~kvslim.eval.harness.suite`): :mod:`~kvslim.eval.tasks.niah_single`,
:mod:`~kvslim.eval.tasks.niah_multikey` (with the ``distractor`` task), :mod:`~kvslim.eval.tasks.niah_multivalue`,
:mod:`~kvslim.eval.tasks.niah_multiquery`, :mod:`~kvslim.eval.tasks.variable_tracking`, :mod:`~kvslim.eval.tasks.common_words`,
:mod:`~kvslim.eval.tasks.frequent_words` on shared :mod:`~kvslim.eval.tasks.needles` / :mod:`~kvslim.eval.tasks.values`.
:mod:`~kvslim.eval.reports.stats` holds the Wilson intervals and the paired sign test. :mod:`~kvslim.eval.harness.runner` runs a grid (model x recipes x lengths x depths x seeds) into
a resumable store (:mod:`~kvslim.eval.harness.store`); :mod:`~kvslim.eval.reports.report` turns a results folder into a table,
heatmaps, a frontier plot and a Markdown summary. Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from .harness.runner import Cell, Grid, run_grid
from .harness.store import ResultStore
from .tasks.base import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task", "Grid", "Cell", "run_grid", "ResultStore", "build_report"]


def build_report(out, **kwargs):  # noqa: ANN001, ANN201 - thin lazy re-export (matplotlib is heavy)
    """See :func:`kvslim.eval.reports.report.build_report`."""
    from .reports.report import build_report as _build

    return _build(out, **kwargs)
