"""Needle-in-a-haystack evaluation of KV-cache recipes on real models (``kvslim niah`` / ``kvslim report``).

Tasks (one module each): :mod:`~kvslim.eval.passkey`, :mod:`~kvslim.eval.needle`, :mod:`~kvslim.eval.multi_needle`,
:mod:`~kvslim.eval.fidelity`, and the RULER-style suite (:mod:`~kvslim.eval.suite`): :mod:`~kvslim.eval.niah_single`,
:mod:`~kvslim.eval.niah_multikey` (with the ``distractor`` task), :mod:`~kvslim.eval.niah_multivalue`,
:mod:`~kvslim.eval.niah_multiquery`, :mod:`~kvslim.eval.variable_tracking`, :mod:`~kvslim.eval.common_words`,
:mod:`~kvslim.eval.frequent_words` on shared :mod:`~kvslim.eval.needles` / :mod:`~kvslim.eval.values`.
:mod:`~kvslim.eval.stats` holds the Wilson intervals and the paired sign test. :mod:`~kvslim.eval.runner` runs a grid (model x recipes x lengths x depths x seeds) into
a resumable store (:mod:`~kvslim.eval.store`); :mod:`~kvslim.eval.report` turns a results folder into a table,
heatmaps, a frontier plot and a Markdown summary. Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from .base import TASKS, Task, get_task
from .runner import Cell, Grid, run_grid
from .store import ResultStore

__all__ = ["TASKS", "Task", "get_task", "Grid", "Cell", "run_grid", "ResultStore", "build_report"]


def build_report(out, **kwargs):  # noqa: ANN001, ANN201 - thin lazy re-export (matplotlib is heavy)
    """See :func:`kvslim.eval.report.build_report`."""
    from .report import build_report as _build

    return _build(out, **kwargs)
