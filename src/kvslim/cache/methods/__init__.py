"""The built-in compression methods, one file each; importing this package registers them (see
:mod:`kvslim.cache.method` for the interface and ``docs/contributing.md`` for adding one)."""

from __future__ import annotations

from . import blocks, full, heavy, latent, v4, window  # noqa: F401  (each file registers its method)

__all__ = ["blocks", "full", "heavy", "latent", "v4", "window"]
