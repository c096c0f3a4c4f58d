"""Bytes actually held by a KV cache, measured from its tensors.

``cache_nbytes`` is the single measuring point used by the CLI, the tests and the planner cross-checks: it asks a
kvslim cache for its own ``nbytes()`` and otherwise sums the storage of every tensor each cache layer holds
(transformers' ``DynamicCache`` layers hold ``keys`` and ``values``; sliding layers hold only their window).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["cache_nbytes", "cache_tiers", "layer_nbytes", "tensor_nbytes"]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of one tensor's elements (numel x element size); views of the same storage count once each."""
    return t.numel() * t.element_size()


def _held_tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
        elif isinstance(value, dict):
            out.extend(v for v in value.values() if isinstance(v, torch.Tensor))
    return out


def layer_nbytes(layer: Any) -> int:
    """Bytes held by one cache layer: its own ``nbytes()`` if it has one, else the sum over its tensors."""
    own = getattr(layer, "nbytes", None)
    if callable(own):
        return int(own())
    seen: set[int] = set()
    total = 0
    for t in _held_tensors(layer):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_nbytes(t)
    return total


def cache_nbytes(cache: Any) -> int:
    """Total bytes held by a transformers ``Cache`` (or a kvslim cache), measured from its tensors."""
    if cache is None:
        return 0
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own())
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cannot measure a cache of type {type(cache).__name__}: it has no .layers")
    return sum(layer_nbytes(layer) for layer in layers)


def cache_tiers(cache: Any) -> dict[str, int] | None:
    """A kvslim cache's ``tier_nbytes()``: ``{"hot", "cold", "fetched"}`` bytes (``fetched``: what its last forward
    call read from the cold tier); None for a cache without tiers (transformers' ``DynamicCache``)."""
    own = getattr(cache, "tier_nbytes", None)
    return {k: int(v) for k, v in own().items()} if callable(own) else None
