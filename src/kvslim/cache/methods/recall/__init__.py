"""The recall family: :mod:`~kvslim.cache.methods.recall.recall` (the method) on its shared parts: the cold tier of
evicted K/V (:mod:`~kvslim.cache.methods.recall.cold`), the per-block summaries that choose what to fetch back
(:mod:`~kvslim.cache.methods.recall.summaries`) and the log-sum-exp merge of attention segments
(:mod:`~kvslim.cache.methods.recall.segments`). See ``docs/recall.md``.
"""
