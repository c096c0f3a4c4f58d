"""The harness: how cells run. Two floors with the tasks between them:

* under the tasks, what runs a model on a prompt: :mod:`~kvslim.eval.harness.engine` (prefill, greedy decoding,
  teacher-forced log-probabilities), :mod:`~kvslim.eval.harness.batch` (batched retrieval cells) and
  :mod:`~kvslim.eval.harness.share` (one recorded prefill fed to several recipes);
* over the tasks, what runs a grid: :mod:`~kvslim.eval.harness.runner` (``Grid``, ``run_grid``),
  :mod:`~kvslim.eval.harness.executors` (local, Ray, batched), :mod:`~kvslim.eval.harness.caches` (cache
  factories per recipe), :mod:`~kvslim.eval.harness.loading` / :mod:`~kvslim.eval.harness.tiny` (models),
  :mod:`~kvslim.eval.harness.store` (the resumable results store), :mod:`~kvslim.eval.harness.campaign` (many
  grids in order under a time budget, resumable: the baselines' sweeps) and :mod:`~kvslim.eval.harness.suite` (the
  RULER-style suites, run as a campaign).
"""
