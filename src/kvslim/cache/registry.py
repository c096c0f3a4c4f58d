"""Which kvslim cache layer produced a key tensor (so the attention function can find its layer).

Stock attention modules call ``cache.update(k, v, layer_idx)`` and then the attention function with the returned
``k``; the function gets neither the cache nor the layer. kvslim layers record ``returned k -> layer`` here, keyed by
tensor identity and held weakly (an entry disappears with its tensor), so nothing leaks between forward passes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["register_output", "layer_for"]

_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_output(key: torch.Tensor, layer: Any) -> None:
    _OUTPUTS[key] = layer


def layer_for(key: torch.Tensor) -> Any | None:
    return _OUTPUTS.get(key)
