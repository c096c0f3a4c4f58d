"""The eviction family: one file per method (``streaming``, ``snapkv``, ``tova``, ``h2o``, ``knorm``, ``expattn``)
on the family's shared parts: :mod:`~kvslim.cache.methods.evict.layer` (``EvictLayer``: a bounded cache that keeps
the tokens its policy scores highest) and :mod:`~kvslim.cache.methods.evict.scores` (the scoring and selection
arithmetic). See ``docs/eviction.md``.
"""
