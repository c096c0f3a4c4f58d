"""Recipe name -> KV cache for the evaluation, and the 16-bit full-cache reference size.

``full`` is always transformers' plain ``DynamicCache`` (the reference every grid includes). Every other recipe goes
through ``kvslim.make_cache(model, recipe)`` from the compressed-cache part of kvslim, imported only when needed; if
that part is absent, or the name is unknown to it, the recipe is refused with an :class:`InvalidInput` before anything
runs. Tests may pass extra factories (``{name: fn(model) -> Cache}``) instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidInput

__all__ = ["FULL", "check_recipes", "cache_factory", "full16_nbytes"]

FULL = "full"
CacheFactories = Mapping[str, Callable[[Any], Any]]


def _recipe_module() -> Any:
    """``kvslim.recipe`` when the compressed caches are part of this install (with ``kvslim.make_cache``), else None."""
    import kvslim

    if "make_cache" not in getattr(kvslim, "_EXPORTS", {}):
        return None
    try:
        return importlib.import_module("kvslim.recipe")
    except ImportError:
        return None


def check_recipes(names: list[str], extra: CacheFactories | None = None) -> list[str]:
    """Validate recipe names (without a model); returns them with ``full`` first and duplicates removed."""
    out = [FULL]
    for raw in names:
        name = raw.strip()
        if not name:
            raise InvalidInput("empty recipe name in --recipes: separate names with single commas")
        if name not in out:
            out.append(name)
    pending = [n for n in out if n != FULL and not (extra and n in extra)]
    if pending:
        mod = _recipe_module()
        if mod is None:
            raise InvalidInput(
                f"recipe {pending[0]!r} needs kvslim's compressed caches (kvslim.recipe / kvslim.make_cache), "
                "which this install lacks; use --recipes full"
            )
        for n in pending:
            try:
                mod.parse_recipe(n)
            except InvalidInput:
                raise
            except Exception as exc:  # a recipe parser that raises something else: still a bad name
                known = ", ".join(_known_presets(mod)) or "see `kvslim recipes`"
                raise InvalidInput(f"unknown recipe {n!r} ({exc}); known presets: {known}") from None
    return out


def _known_presets(mod: Any) -> list[str]:
    try:
        return [r["name"] if isinstance(r, dict) else getattr(r, "name", str(r)) for r in mod.list_recipes()]
    except Exception:
        return []


def cache_factory(recipe: str, extra: CacheFactories | None = None) -> Callable[[Any], Any]:
    """A function ``model -> fresh empty cache`` for ``recipe``."""
    if extra and recipe in extra:
        return extra[recipe]
    if recipe == FULL:

        def full(model: Any) -> Any:
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        return full
    try:
        make_cache = importlib.import_module("kvslim").make_cache
    except (ImportError, AttributeError):
        raise InvalidInput(
            f"recipe {recipe!r} needs kvslim.make_cache (the compressed caches), which this install lacks; use --recipes full"
        ) from None

    def compressed(model: Any) -> Any:
        return make_cache(model, recipe)

    return compressed


def full16_nbytes(config: Any, n_tokens: int) -> int:
    """Bytes a 16-bit ``DynamicCache`` holds after ``n_tokens`` tokens (K and V, batch 1).

    Full-attention layers hold every token; sliding-window layers hold the last ``sliding_window - 1`` tokens, as
    transformers' ``DynamicSlidingWindowLayer`` does.
    """
    from ..models import describe

    facts = describe(config)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    total = 0
    for kind in facts.layer_kinds:
        held = min(n_tokens, int(window) - 1) if kind.startswith("sliding") and window else n_tokens
        total += 2 * held * facts.kv_heads * facts.head_dim * 2
    return total
