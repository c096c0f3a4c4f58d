"""Reports over a results store: :mod:`~kvslim.eval.reports.report` (tables, heatmaps, frontier, summary),
:mod:`~kvslim.eval.reports.suite_report` (suite tables), :mod:`~kvslim.eval.reports.stats` (Wilson intervals, the
paired sign test) and :mod:`~kvslim.eval.reports.ruler_docs` (the RULER page of the docs).
"""
