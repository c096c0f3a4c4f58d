"""Where kvslim keeps files on disk: ``cache_dir()`` (``$KVSLIM_CACHE``, default ``~/.cache/kvslim``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Root of kvslim's on-disk caches (converted models, latent bases): ``$KVSLIM_CACHE`` or ``~/.cache/kvslim``."""
    return Path(os.environ.get("KVSLIM_CACHE") or Path.home() / ".cache" / "kvslim").expanduser()
