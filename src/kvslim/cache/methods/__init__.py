"""The built-in compression methods, one file each, grouped in families; importing this package registers them, in
the order of ``BUILTIN`` (the order ``kvslim recipes`` lists them). See :mod:`kvslim.cache.method` for the interface
and ``docs/contributing.md`` for adding a method: a new built-in is one file plus its name in ``BUILTIN``.
Stand-alone methods are files here (``full``, ``window``, ``blocks``, ``heavy``, ``v4``); a family is a package
holding its methods and their shared parts: :mod:`~kvslim.cache.methods.latent`, :mod:`~kvslim.cache.methods.recall`
and :mod:`~kvslim.cache.methods.evict` (the field's eviction baselines, see ``docs/eviction.md``).
"""

from __future__ import annotations

import importlib

BUILTIN = ("full", "window", "blocks", "heavy", "v4", "latent", "recall", "streaming", "snapkv", "tova", "h2o", "knorm",
           "expattn")
# method -> its family package (methods not named here are files of this package)
FAMILY = {"latent": "latent", "recall": "recall", "streaming": "evict", "snapkv": "evict", "tova": "evict",
          "h2o": "evict", "knorm": "evict", "expattn": "evict"}  # fmt: skip

for _name in BUILTIN:
    importlib.import_module(".".join((__name__, FAMILY[_name], _name) if _name in FAMILY else (__name__, _name)))

__all__ = ["BUILTIN", "FAMILY"]
