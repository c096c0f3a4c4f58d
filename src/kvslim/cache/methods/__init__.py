"""The built-in compression methods, one file each; importing this package registers them (see
:mod:`kvslim.cache.method` for the interface and ``docs/contributing.md`` for adding one)."""

from __future__ import annotations

# each file registers its method; h2o, knorm, snapkv, streaming and tova are the field's eviction baselines
from . import blocks, full, h2o, heavy, knorm, latent, snapkv, streaming, tova, v4, window  # noqa: F401

__all__ = ["blocks", "full", "h2o", "heavy", "knorm", "latent", "snapkv", "streaming", "tova", "v4", "window"]
