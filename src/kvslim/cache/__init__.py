"""Compressed KV caches for stock transformers models (see :mod:`kvslim.recipe` for the recipe grammar).

``make_cache(model, recipe)`` returns a transformers ``Cache`` to pass as ``cache=`` to ``forward``/``generate``.
"""

from __future__ import annotations

from .build import KvslimCache, check_recipe, compressed, full16_nbytes, make_cache

__all__ = ["KvslimCache", "check_recipe", "compressed", "full16_nbytes", "make_cache"]
