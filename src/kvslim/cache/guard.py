"""What a kvslim cache belongs to: the model config it was built for and the batch it holds.

A cache records :func:`owner_of` its model when built; :func:`check_update` (called by ``KvslimCache.update``)
refuses key/value states from a model of another shape (layer count, KV heads, head dim) or a batch other than the
one the cache already holds, and :func:`check_model` (called by :func:`kvslim.generate`) refuses a model whose config
differs. :func:`check_consistent` (called by ``KvslimCache.update`` as a forward starts, and by
:func:`kvslim.generate` for any cache it continues) refuses a cache whose layers hold different token counts: an
exception in the middle of a forward (a hook raising in layer 15) leaves the first layers with the new tokens and
the rest without, and continuing would answer silently wrong. Each raises one clear ``InvalidInput`` instead of an
``IndexError``, a size mismatch deep inside torch or a wrong answer.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput

__all__ = ["owner_of", "check_consistent", "check_model", "check_update"]

_FIELDS = ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size")


def owner_of(model: Any) -> dict[str, Any]:
    """The config facts a cache depends on: model type, layers, KV heads, head dim, hidden size, vocabulary."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(cfg.num_attention_heads)
    return {
        "model_type": str(getattr(cfg, "model_type", "")),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
    }


def _describe(o: dict[str, Any]) -> str:
    return (f"{o['model_type']} ({o['num_hidden_layers']} layers, {o['num_key_value_heads']} KV heads of dim "
            f"{o['head_dim']}, hidden {o['hidden_size']}, vocab {o['vocab_size']})")  # fmt: skip


def check_model(cache: Any, model: Any) -> None:
    """Refuse ``model`` unless ``cache`` was built for a model with the same config facts."""
    owner = getattr(cache, "owner", None)
    if owner is None:
        return
    now = owner_of(model)
    if now != owner:
        raise InvalidInput(f"this kvslim cache was built for {_describe(owner)}, not for this {_describe(now)}: "
                           "build one with kvslim.make_cache(model, recipe) for each model")  # fmt: skip


def check_consistent(cache: Any) -> None:
    """Refuse a cache (any transformers ``Cache`` with ``layers``) whose layers have seen different token counts,
    or a kvslim layer holding states it never attended (``pending``): a forward was interrupted part-way."""
    layers = list(getattr(cache, "layers", None) or [])
    counts = [int(layer.get_seq_length()) for layer in layers]
    torn = [i for i, layer in enumerate(layers) if getattr(layer, "pending", None) is not None]
    if len(set(counts)) <= 1 and not torn:
        return
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(counts):
        groups.setdefault(n, []).append(i)
    held = ", ".join(f"{n} tokens in {_layer_list(ix)}" for n, ix in groups.items())
    what = f"its layers hold different token counts ({held})" if len(groups) > 1 else \
        f"{_layer_list(torn)} stored tokens without attending them"
    raise InvalidInput(f"this cache is inconsistent: {what}, as when an exception interrupts a forward part-way; "
                       "it would answer wrong: build a new cache (kvslim.make_cache) and prefill again")  # fmt: skip


def _layer_list(ix: list[int]) -> str:
    runs, start = [], ix[0]
    for a, b in zip(ix, [*ix[1:], None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ("layer " if len(ix) == 1 else "layers ") + ", ".join(runs)


def check_update(cache: Any, key_states: Any, layer_idx: int) -> None:
    """Refuse new ``[b, h, q, d]`` states that do not fit ``cache`` (layer index, heads, dim, batch)."""
    owner = cache.owner
    if not 0 <= layer_idx < len(cache.layers):
        raise InvalidInput(f"this kvslim cache has {len(cache.layers)} layers ({_describe(owner)}) but a model wrote "
                           f"layer {layer_idx}: it was built for another model; use kvslim.make_cache(model, recipe)")  # fmt: skip
    b, h, _, d = key_states.shape
    if (h, d) != (owner["num_key_value_heads"], owner["head_dim"]):
        raise InvalidInput(f"this kvslim cache was built for {_describe(owner)} but received {h} KV heads of dim {d}: "
                           "it belongs to another model; use kvslim.make_cache(model, recipe)")  # fmt: skip
    layer = cache.layers[layer_idx]
    if getattr(layer, "is_initialized", False):
        valid = getattr(layer, "tail_valid", None)
        held = int(valid.shape[0]) if valid is not None else int(layer.batch)
        if b != held:
            raise InvalidInput(f"this kvslim cache holds a batch of {held} sequence(s) but received a batch of {b}: "
                               "use a fresh cache for a new batch (kvslim.make_cache)")  # fmt: skip
