"""Recipe name -> KV cache for the evaluation.

``full`` is always transformers' plain ``DynamicCache`` (the reference every grid includes). Every other recipe goes
through ``kvslim.make_cache(model, recipe)``; a name the recipe grammar refuses is refused with an
:class:`InvalidInput` before anything runs. Tests may pass extra factories (``{name: fn(model) -> Cache}``) instead.
A recipe is parsed once, when the grid is checked (:func:`check_recipes`); the functions here take the parsed
:class:`~kvslim.cache.recipe.Recipe` (or ``full`` and a test factory's name, which stay strings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import InvalidInput
from .engine import PrefillPlan

if TYPE_CHECKING:
    from .share import Shared

__all__ = ["FULL", "check_recipes", "cache_factory", "chunks_invariantly", "prefill_plan", "recipe_key",
           "run_recipe", "stored_recipe_key", "given_recipe_key"]

FULL = "full"
CacheFactories = Mapping[str, Callable[[Any], Any]]


def check_recipes(names: list[Any], extra: CacheFactories | None = None) -> list[Any]:
    """Parse the recipes of a grid once (without a model): names or already parsed recipes in, with ``full`` first
    and duplicate names removed; out, ``full`` and test factories' names as strings, every other recipe as its
    :class:`~kvslim.cache.recipe.Recipe` (the one parse it gets)."""
    from ...cache.recipe import Recipe, parse_recipe

    out: list[Any] = [FULL]
    for raw in names:
        name = raw if isinstance(raw, Recipe) else raw.strip()
        if not name:
            raise InvalidInput("empty recipe name in --recipes: separate names with single commas")
        if name not in out:
            out.append(name)
    return [n if n == FULL or (extra and n in extra) or isinstance(n, Recipe) else parse_recipe(n) for n in out]


def cache_factory(recipe: Any, extra: CacheFactories | None = None) -> Callable[[Any], Any]:
    """A function ``model -> fresh empty cache`` for ``recipe`` (``full``, a test factory's name, or a parsed
    :class:`~kvslim.cache.recipe.Recipe`; a string is parsed by ``make_cache`` at every call)."""
    if extra and recipe in extra:
        return extra[recipe]
    if recipe == FULL:

        def full(model: Any) -> Any:
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        return full

    def compressed(model: Any) -> Any:
        from ...cache import make_cache

        return make_cache(model, recipe)

    return compressed


def chunks_invariantly(recipe: Any, extra: CacheFactories | None = None, chunk: int = 0) -> bool:
    """Whether ``recipe``'s cache gives the same results in one call or in chunks (of ``chunk`` tokens, if given)
    (``full``, and :func:`kvslim.cache.recipe.chunk_invariant`; a test factory's invariance is unknown: False)."""
    from ...cache.recipe import chunk_invariant

    if recipe == FULL:
        return True
    return not (extra and recipe in extra) and chunk_invariant(recipe, chunk)


def prefill_plan(recipe: Any, cache: Any, chunk: int = 0, where_invariant: bool = False,
                 extra: CacheFactories | None = None, shared: Shared | None = None) -> PrefillPlan:
    """``recipe``'s :class:`~kvslim.eval.harness.engine.PrefillPlan`, decided once per grid run from an empty
    ``cache`` of it.

    ``chunk`` tokens per prefill call (``--prefill-chunk``): given as asked (the runner refused the grid if the
    recipe is not chunk-invariant), or, with ``where_invariant``, only to a recipe that is
    (:func:`chunks_invariantly`), the others prefilling in one call. ``shared`` (a pool of recorded context
    prefills): given only where the cache declares ``shares_context_prefill`` (its method's capability: the
    eviction family)."""
    if where_invariant and not chunks_invariantly(recipe, extra, chunk):
        chunk = 0
    share = shared if shared is not None and getattr(cache, "shares_context_prefill", False) else None
    return PrefillPlan(int(chunk), share)


def recipe_key(name: Any, extra: CacheFactories | None = None) -> str:
    """The one spelling a recipe is stored and reported under (``stream`` and ``window:w=256`` are one recipe, and
    so are ``recall`` and ``recall:store=disk``): its :func:`kvslim.cache.recipe.identity`; ``full`` and test factories
    keep their names. Raises ``InvalidInput`` for a bad recipe."""
    if name == FULL or (extra and name in extra):
        return name
    from ...cache.recipe import identity

    return identity(name)


def run_recipe(name: Any, extra: CacheFactories | None = None) -> str:
    """The spelling a recipe is run under: its canonical form, placement parameters included (``store=disk`` must
    reach the cache); ``full`` and test factories keep their names."""
    if name == FULL or (extra and name in extra):
        return name
    from ...cache.recipe import canonical

    return canonical(name)


@functools.lru_cache(maxsize=4096)
def stored_recipe_key(name: str) -> str:
    """:func:`recipe_key` for a recipe read back from a store or of a cell (a canonical string: parameters it
    leaves out are at the defaults of when it was written, :func:`kvslim.cache.recipe.read_back`); a name that does
    not parse, such as a test factory's, is kept as it is."""
    if name == FULL:
        return name
    from ...cache.recipe import read_back

    try:
        return read_back(name)
    except Exception:
        return name


def given_recipe_key(name: str) -> str:
    """:func:`recipe_key` for a recipe as a user types it (today's defaults), kept as it is if it does not parse."""
    try:
        return recipe_key(name)
    except Exception:
        return name
