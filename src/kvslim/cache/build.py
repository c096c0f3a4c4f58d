"""``make_cache(model, recipe)``: check a recipe against a model, then build a transformers ``Cache`` for it.

Everything that can be refused is refused before any tensor is allocated: malformed recipes, impossible parameters
(each method's :meth:`~kvslim.cache.method.Method.check`: ``latent`` rank above the head dim, pooling without RoPE),
models kvslim cannot plug into (no ``AttentionInterface`` dispatch, attention other than sdpa/eager, layer types
other than full/sliding attention), unavailable codecs.

The model is switched once to kvslim's attention, which runs the model's own stock attention for every other cache
(:mod:`kvslim.cache.attention`): nothing needs restoring. Use the cache as ``model.generate(..., cache=cache)``.

Gemma 3 (and any model with sliding layers): local layers keep their native window exactly, as the model was
trained; methods apply to the global (full-attention) layers, the storage codec to every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from transformers.cache_utils import Cache

from ..errors import InvalidInput
from ..formats import REGISTRY
from .attention import kvslim_name_for, select_kvslim_attention
from .base import BaseLayer, LayerContext
from .guard import check_consistent, check_update, owner_of
from .method import ModelShape
from .recipe import LayerSpec, Recipe, Resolved, parse_recipe, resolve
from .rope import inv_freq_for_layer
from .storage import make_storage_codec
from .tap import TAP

__all__ = ["KvslimCache", "check_recipe", "compressed", "make_cache", "predict_nbytes"]


class KvslimCache(Cache):
    """A transformers ``Cache`` of kvslim layers (:class:`~kvslim.cache.base.BaseLayer` s) with exact bytes."""

    def __init__(self, layers: list[BaseLayer], recipe: Recipe, shape: ModelShape, owner: dict | None = None) -> None:
        super().__init__(layers=layers)
        self.recipe = recipe
        self.shape = shape
        self.owner = owner  # the config facts it belongs to (kvslim.cache.guard)
        self.closed = False

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        if self.closed:  # before any layer stores anything: the cache stays as close() left it
            raise InvalidInput("this cache was closed (cache.close() released its cold tier): it cannot be used "
                               "any more; build a new one with kvslim.make_cache")  # fmt: skip
        check_update(self, key_states, layer_idx)  # another model or batch: one clear error, not a torch one
        if layer_idx == 0:  # a forward starts: every layer must have seen the same tokens (none torn by an exception)
            check_consistent(self)
        tap = TAP.get()
        if tap is not None:
            tap.on_update(self, layer_idx, key_states, value_states, args, kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def shares_context_prefill(self) -> bool:
        """Whether this cache's context prefill may be replayed from another's recording (its method declares it:
        :attr:`kvslim.cache.method.Method.shares_context_prefill`; :mod:`kvslim.eval.harness.share`)."""
        return bool(self.recipe.method.shares_context_prefill)

    def nbytes(self) -> int:
        """Bytes held by every layer (packed K/V, side tensors, latent bases) plus each codec's constants once."""
        return sum(self.layer_nbytes())

    def layer_nbytes(self) -> list[int]:
        """Per layer: its data bytes, plus the constants of each codec it is the first layer to use (codecs are
        shared by the layers of a cache, so their constants are held once)."""
        seen: set[int] = set()
        out = []
        for layer in self.layers:
            total = layer.nbytes(include_codec_state=False)
            for c in layer.codecs if layer.is_initialized else []:
                if id(c) not in seen:
                    seen.add(id(c))
                    total += int(c.state_nbytes())
            out.append(total)
        return out

    def tier_nbytes(self) -> dict[str, int]:
        """``{"hot": nbytes(), "cold": ..., "fetched": ...}`` summed over layers (one-tier methods: cold = fetched = 0).
        After a fork (:meth:`fork`), ``cold`` counts the shared cold rows in the cache that was forked only, and
        ``cold_shared`` (present when non-zero) is what this cache reads but another counts (:mod:`kvslim.cache.fork`)."""
        if self.closed:  # the cold tier was released: nothing is held there
            return {"hot": self.nbytes(), "cold": 0, "fetched": 0}
        tiers = [layer.tier_nbytes() for layer in self.layers]
        out = {"hot": self.nbytes(), "cold": sum(t["cold"] for t in tiers), "fetched": sum(t["fetched"] for t in tiers)}
        shared = sum(s.shared_nbytes() for layer in self.layers for s in (getattr(layer, "cold_k", None),
                     getattr(layer, "cold_v", None)) if callable(getattr(s, "shared_nbytes", None)))  # fmt: skip
        if shared:
            out["cold_shared"] = shared
        return out

    def fork(self) -> KvslimCache:
        """A copy that continues on its own: hot tier copied, a tiered method's cold tier shared read-only
        (:func:`kvslim.cache.fork.fork_cache`). Prefill a context once, fork it per question."""
        from .fork import fork_cache

        return fork_cache(self)

    def close(self) -> None:
        """Release what layers hold outside the process's tensors (a tiered method's cold files: ``tier_nbytes()``
        then reports 0 cold bytes); the cache cannot be used afterwards (a forward raises ``InvalidInput``).
        Garbage collection does the same. Closing twice is harmless."""
        self.closed = True
        for layer in self.layers:
            if callable(getattr(layer, "close", None)):
                layer.close()
        from .fork import release_shared

        release_shared(self)  # a fork's shared cold rows: released by the last cache reading them

    def layer_labels(self) -> list[str]:
        return [layer.spec.label for layer in self.layers]

    def __repr__(self) -> str:
        return f"KvslimCache(recipe={str(self.recipe)!r}, layers={len(self.layers)})"


def check_recipe(model: Any, recipe: str | Recipe) -> tuple[Recipe, list[LayerSpec]]:
    """Validate ``recipe`` against ``model``; returns the parsed recipe and one layer spec per layer."""
    res = _check(model, recipe)
    return res.recipe, list(res.specs)


def _check(model: Any, recipe: str | Recipe) -> Resolved:
    """``recipe`` resolved against ``model`` (:func:`kvslim.cache.recipe.resolve`), every reason refused and every
    layer's codec made once, before anything is allocated."""
    r = parse_recipe(recipe)
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        raise InvalidInput(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so kvslim caches cannot plug into it; use a Llama/Qwen/Mistral/Gemma-family model"
        )
    kvslim_name_for(model)
    res = resolve(r, ModelShape.from_model(model))
    for spec in res.require():  # refuses unknown/unavailable codecs (or a dim they cannot take) up front
        dim = spec.layer_class().stored_dim(spec, res.shape)
        make_storage_codec(r.codec, dim, role="key")
    return res


def make_cache(model: Any, recipe: str | Recipe = "full", *, tokenizer: Any = None, seed: int = 0) -> KvslimCache:
    """A compressed KV cache for ``model`` following ``recipe`` (string or :class:`Recipe`).

    Use as ``model.generate(..., cache=make_cache(model, "v4+tq3"))``. The model runs kvslim's attention from now
    on, which is its own stock attention for every other cache. ``tokenizer`` is used only to calibrate latent bases
    (default: the tokenizer stored next to the model weights).
    """
    res = _check(model, recipe)
    r, specs, shape = res.recipe, list(res.specs), res.shape
    extras = r.method.prepare(model, specs, tokenizer)
    layers = []
    pool: dict[tuple, Any] = {}  # codec instances shared by layers (one rotation per codec, dim and role)
    for i, spec in enumerate(specs):
        inv = inv_freq_for_layer(model, shape.layer_types[i])

        def factory(dim: int, role: str, _codec: str = spec.codec, _layer: int = i) -> Any:
            fmt = REGISTRY.get(_codec)
            key = (_codec, dim, role if fmt is not None and fmt.per_role else "")
            if fmt is not None and fmt.calibrated:  # fitted per layer and stream: never shared
                key = (*key, _layer, role)
            if key not in pool:
                pool[key] = make_storage_codec(_codec, dim, seed, role=role)
            return pool[key]

        ctx = LayerContext(factory, i, inv.to(model.device) if inv is not None else None, extras.get(i, {}))
        layers.append(spec.build(ctx))
    select_kvslim_attention(model)
    return KvslimCache(layers, r, shape, owner_of(model))


@contextlib.contextmanager
def compressed(model: Any, recipe: str | Recipe, **kwargs: Any) -> Iterator[KvslimCache]:
    """``with compressed(model, "v4+tq3") as cache: ...``: the same as ``make_cache`` (kept for existing callers)."""
    yield make_cache(model, recipe, **kwargs)


def predict_nbytes(shape: ModelShape, recipe: str | Recipe, n_tokens: int, batch: int = 1) -> list[int]:
    """Per layer, the bytes a cache of ``recipe`` holds after ``n_tokens`` unpadded tokens, codec constants
    excluded: what ``layer.nbytes(include_codec_state=False)`` reports (the planner's arithmetic)."""
    specs = resolve(recipe, shape).specs
    return [s.layer_class().predict(s, n_tokens, shape, batch)["stored"] for s in specs]
