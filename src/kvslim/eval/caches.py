"""Recipe name -> KV cache for the evaluation.

``full`` is always transformers' plain ``DynamicCache`` (the reference every grid includes). Every other recipe goes
through ``kvslim.make_cache(model, recipe)``; a name the recipe grammar refuses is refused with an
:class:`InvalidInput` before anything runs. Tests may pass extra factories (``{name: fn(model) -> Cache}``) instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidInput

__all__ = ["FULL", "check_recipes", "cache_factory", "chunks_invariantly", "recipe_key", "stored_recipe_key"]

FULL = "full"
CacheFactories = Mapping[str, Callable[[Any], Any]]


def check_recipes(names: list[str], extra: CacheFactories | None = None) -> list[str]:
    """Validate recipe names (without a model); returns them with ``full`` first and duplicates removed."""
    from ..recipe import parse_recipe

    out = [FULL]
    for raw in names:
        name = raw.strip()
        if not name:
            raise InvalidInput("empty recipe name in --recipes: separate names with single commas")
        if name not in out:
            out.append(name)
    for n in out:
        if n != FULL and not (extra and n in extra):
            parse_recipe(n)
    return out


def cache_factory(recipe: str, extra: CacheFactories | None = None) -> Callable[[Any], Any]:
    """A function ``model -> fresh empty cache`` for ``recipe``."""
    if extra and recipe in extra:
        return extra[recipe]
    if recipe == FULL:

        def full(model: Any) -> Any:
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        return full

    def compressed(model: Any) -> Any:
        from ..cache import make_cache

        return make_cache(model, recipe)

    return compressed


def chunks_invariantly(recipe: str, extra: CacheFactories | None = None, chunk: int = 0) -> bool:
    """Whether ``recipe``'s cache gives the same results in one call or in chunks (of ``chunk`` tokens, if given)
    (``full``, and :func:`kvslim.recipe.chunk_invariant`; a test factory's invariance is unknown: False)."""
    from ..recipe import chunk_invariant

    if recipe == FULL:
        return True
    return not (extra and recipe in extra) and chunk_invariant(recipe, chunk)


def recipe_key(name: str, extra: CacheFactories | None = None) -> str:
    """The one spelling a recipe is stored and reported under (``stream`` and ``window:w=256`` are one recipe, and
    so are ``recall`` and ``recall:store=disk``): its :func:`kvslim.recipe.identity`; ``full`` and test factories
    keep their names. Raises ``InvalidInput`` for a bad recipe."""
    if name == FULL or (extra and name in extra):
        return name
    from ..recipe import identity

    return identity(name)


@functools.lru_cache(maxsize=4096)
def stored_recipe_key(name: str) -> str:
    """:func:`recipe_key` for a recipe read back from a store or of a cell (a name that does not parse, such as a
    test factory's, is kept as it is)."""
    try:
        return recipe_key(name)
    except Exception:
        return name
