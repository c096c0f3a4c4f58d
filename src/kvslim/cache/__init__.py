"""Compressed KV caches for stock transformers models (see :mod:`kvslim.cache.recipe` for the recipe grammar).

``make_cache(model, recipe)`` returns a transformers ``Cache`` to pass as ``cache=`` to ``forward``/``generate``.
Methods live one per file in :mod:`kvslim.cache.methods` on the shared layer of :mod:`kvslim.cache.base`; the
registry is :mod:`kvslim.cache.method`. Names are imported on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "KvslimCache": "kvslim.cache.build",
    "check_recipe": "kvslim.cache.build",
    "compressed": "kvslim.cache.build",
    "make_cache": "kvslim.cache.build",
    "predict_nbytes": "kvslim.cache.build",
    "full16_nbytes": "kvslim.hf_config",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("kvslim.cache", _EXPORTS, globals())
