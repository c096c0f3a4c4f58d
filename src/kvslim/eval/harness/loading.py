"""Model names of the evaluation: embedded models, tiny test models and local paths, checked and loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import InvalidInput

__all__ = ["check_model_name", "load_pair"]


def check_model_name(name: str) -> None:
    """Refuse a model name that is neither embedded, tiny, nor a path (before anything loads)."""
    from ...models import EMBEDDED_MODELS
    from .tiny import TINY_MODELS

    if name in EMBEDDED_MODELS or name in TINY_MODELS or "/" in name or name.endswith(".gguf") or Path(name).exists():
        return
    known = ", ".join([*EMBEDDED_MODELS, *TINY_MODELS])
    raise InvalidInput(f"unknown model {name!r}: known models are {known}, or give a local HF folder or .gguf file")


def load_pair(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded model, a local path, or a tiny test model."""
    from .tiny import TINY_MODELS, tiny_pair

    if name in TINY_MODELS:
        return tiny_pair(name)
    from ...models import load

    return load(name)
