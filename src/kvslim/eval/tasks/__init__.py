"""Evaluation tasks, one module each, on their shared parts.

The contract and the registry: :mod:`~kvslim.eval.tasks.base` (``Task``, ``TASKS``, ``get_task``). Tasks:
:mod:`~kvslim.eval.tasks.passkey`, :mod:`~kvslim.eval.tasks.needle`, :mod:`~kvslim.eval.tasks.multi_needle`,
:mod:`~kvslim.eval.tasks.fidelity`, and the RULER-style suite: :mod:`~kvslim.eval.tasks.niah_single`,
:mod:`~kvslim.eval.tasks.niah_multikey` (with ``distractor``), :mod:`~kvslim.eval.tasks.niah_multivalue`,
:mod:`~kvslim.eval.tasks.niah_multiquery`, :mod:`~kvslim.eval.tasks.variable_tracking`,
:mod:`~kvslim.eval.tasks.common_words`, :mod:`~kvslim.eval.tasks.frequent_words`. Shared parts: prompts
(:mod:`~kvslim.eval.tasks.prompt`, :mod:`~kvslim.eval.tasks.haystack`), needles and values
(:mod:`~kvslim.eval.tasks.needles`, :mod:`~kvslim.eval.tasks.values`, :mod:`~kvslim.eval.tasks.facts`) and the
aggregation prompts of cwe / fwe (:mod:`~kvslim.eval.tasks.aggregate`).
"""
