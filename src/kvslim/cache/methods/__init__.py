"""The built-in compression methods, one file each; importing this package registers them, in the order of
``BUILTIN`` (the order ``kvslim recipes`` lists them). See :mod:`kvslim.cache.method` for the interface and
``docs/contributing.md`` for adding a method: a new built-in is one file here plus its name in ``BUILTIN``.
The last six are the field's eviction baselines (see ``docs/eviction.md``).
"""

from __future__ import annotations

import importlib

BUILTIN = ("full", "window", "blocks", "heavy", "v4", "latent", "recall", "streaming", "snapkv", "tova", "h2o", "knorm",
           "expattn")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["BUILTIN"]
