"""``make_cache(model, recipe)``: check a recipe against a model, then build a transformers ``Cache`` for it.

Everything that can be refused is refused before any tensor is allocated: malformed recipes, impossible parameters
(``latent`` rank above the head dim), models kvslim cannot plug into (no ``AttentionInterface`` dispatch, layer
types other than full/sliding attention, no RoPE for pooled or latent layers), unavailable codecs.

The returned cache switches ``model`` to the ``kvslim`` attention (``cache.restore_attention()`` or
:func:`compressed` switch it back); it is then used as ``model.generate(..., cache=cache)``.

Gemma 3 (and any model with sliding layers): local layers keep their native window exactly, as the model was
trained; structural recipes apply to the global (full-attention) layers, the storage codec to every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from transformers.cache_utils import Cache

from ..errors import InvalidInput
from ..recipe import LayerSpec, Recipe, parse_recipe
from .attention import ATTN_NAME, current_attn, ensure_registered, switch_attention
from .layer import KvslimLayer
from .rope import inv_freq_for_layer
from .storage import CALIBRATED_CODECS, make_storage_codec

__all__ = ["KvslimCache", "check_recipe", "compressed", "full16_nbytes", "make_cache"]


class KvslimCache(Cache):
    """A transformers ``Cache`` of :class:`KvslimLayer` s with exact byte accounting."""

    def __init__(self, layers: list[KvslimLayer], recipe: Recipe, model: Any, previous_attn: str | None) -> None:
        super().__init__(layers=layers)
        self.recipe = recipe
        self._model_ref = model
        self.previous_attn = previous_attn
        self.tier = None  # the cold tier of tiered layers (recall), set by make_cache

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

    def layer_labels(self) -> list[str]:
        return [getattr(layer, "label", None) or layer.spec.label for layer in self.layers]

    def tier_nbytes(self) -> dict[str, int]:
        """Bytes by tier: ``hot`` (= ``nbytes()``), ``cold`` (rows in the cold tier), and the cold bytes fetched:
        ``fetched_last_step`` (the last decode step, all layers), ``fetched_total`` and ``fetched_tokens_last_step``
        (per KV head, summed over layers). Caches without a cold tier report zeros for the cold figures."""
        cold = fetched = total = tokens = 0
        for layer in self.layers:
            if hasattr(layer, "cold_nbytes") and layer.is_initialized:
                cold += layer.cold_nbytes()
                fetched += layer.last_fetched_bytes
                total += layer.cold_k.fetched_bytes + layer.cold_v.fetched_bytes
                tokens += layer.last_fetched_tokens
        return {"hot": self.nbytes(), "cold": cold, "fetched_last_step": fetched, "fetched_total": total,
                "fetched_tokens_last_step": tokens}  # fmt: skip

    def close(self) -> None:
        """Release the cold tier (its files and temporary folder); the cache cannot be used afterwards."""
        if self.tier is not None:
            self.tier.close()

    def restore_attention(self) -> None:
        """Switch the model back to the attention implementation it had before ``make_cache``."""
        switch_attention(self._model_ref, self.previous_attn)

    def __repr__(self) -> str:
        return f"KvslimCache(recipe={str(self.recipe)!r}, layers={len(self.layers)})"


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _layer_types(cfg: Any) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _kwargs = get_layer_types_and_kwargs(cfg)
    return list(types)


def head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def check_recipe(model: Any, recipe: str | Recipe) -> tuple[Recipe, list[LayerSpec]]:
    """Validate ``recipe`` against ``model``; returns the parsed recipe and one ``LayerSpec`` per layer."""
    r = parse_recipe(recipe)
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        raise InvalidInput(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so kvslim caches cannot plug into it; use a Llama/Qwen/Mistral/Gemma-family model"
        )
    cfg = _text_config(model)
    types = _layer_types(cfg)
    specs = r.layer_specs(types, getattr(cfg, "sliding_window", None))
    d = head_dim(cfg)
    if r.full_first > len(types):
        raise InvalidInput(f"full_first={r.full_first} exceeds the model's {len(types)} layers")
    for i, spec in enumerate(specs):
        if spec.mode in ("blocks", "latent") and inv_freq_for_layer(model, types[i]) is None:
            raise InvalidInput(f"recipe {r} pools or projects pre-RoPE keys, but the model has no rotary embedding")
        if spec.mode == "latent" and spec.rank > d:
            raise InvalidInput(f"latent rank r={spec.rank} exceeds the model's head dim {d}; use r <= {d}")
    for spec in specs:  # refuses unknown/unavailable codecs (or a dim they cannot take) up front
        make_storage_codec(r.codec, spec.rank if spec.mode == "latent" else d, role="key")
        if spec.mode == "recall":
            from .cold import _check_folder, check_cold_codec

            opts = dict(spec.options)
            check_cold_codec(opts["cold"], d)
            if opts["dir"]:
                _check_folder(opts["dir"])
    return r, specs


def make_cache(model: Any, recipe: str | Recipe = "full", *, tokenizer: Any = None, seed: int = 0) -> KvslimCache:
    """A compressed KV cache for ``model`` following ``recipe`` (string or :class:`Recipe`).

    Use as ``model.generate(..., cache=make_cache(model, "v4+tq3"))``. The model is switched to the ``kvslim``
    attention; ``cache.restore_attention()`` switches it back (other caches keep working meanwhile: the kvslim
    attention runs transformers' sdpa for any layer that is not a kvslim layer). ``tokenizer`` is used only to
    calibrate latent bases (default: the tokenizer stored next to the model weights).
    """
    r, specs = check_recipe(model, recipe)
    cfg = _text_config(model)
    types = _layer_types(cfg)
    bases: dict[int, Any] = {}
    latent_layers = [i for i, s in enumerate(specs) if s.mode == "latent"]
    if latent_layers:
        from .latent import latent_bases

        bases = latent_bases(model, latent_layers, types, r.get("r"), r.get("calib"), tokenizer)
    layers: list[Any] = []
    tier = None
    pool: dict[tuple, Any] = {}  # codec instances shared by layers (one rotation per codec, dim and role)
    for i, spec in enumerate(specs):
        if spec.mode == "recall":
            from .cold import ColdTier
            from .recall import RecallLayer

            opts = dict(spec.options)
            if tier is None:
                tier = ColdTier(opts["store"], opts["dir"] or None)
            opts.update(codec=spec.codec, window_codec=spec.window_codec)
            layers.append(RecallLayer(opts, tier, f"layer{i}"))
            continue
        inv = inv_freq_for_layer(model, types[i]) if spec.mode in ("blocks", "latent") else None
        basis = bases.get(i)
        if basis is not None:
            basis = tuple(u.to(model.device) for u in basis)

        def factory(dim: int, role: str, _codec: str = spec.codec, _layer: int = i) -> Any:
            key = (_codec, dim, role if _codec.startswith("kivi") else "")
            if _codec in CALIBRATED_CODECS:  # outlier channels are fitted per layer and stream
                key = (*key, _layer, role)
            if key not in pool:
                pool[key] = make_storage_codec(_codec, dim, seed, role=role)
            return pool[key]

        layers.append(KvslimLayer(spec, factory, inv.to(model.device) if inv is not None else None, basis))
    ensure_registered()
    previous = current_attn(model)
    switch_attention(model, ATTN_NAME)
    cache = KvslimCache(layers, r, model, previous if previous != ATTN_NAME else "sdpa")
    cache.tier = tier
    return cache


@contextlib.contextmanager
def compressed(model: Any, recipe: str | Recipe, **kwargs: Any) -> Iterator[KvslimCache]:
    """``with compressed(model, "v4+tq3") as cache: model.generate(..., cache=cache)``; restores the attention."""
    previous = current_attn(model)
    cache = make_cache(model, recipe, **kwargs)
    try:
        yield cache
    finally:
        switch_attention(model, previous)


def full16_nbytes(model: Any, n_tokens: int, batch: int = 1) -> int:
    """Bytes a stock transformers ``DynamicCache`` would hold in 16 bits after ``n_tokens`` tokens: every token in
    full layers, the last ``sliding_window - 1`` in sliding layers (computed exactly from the config)."""
    cfg = _text_config(model)
    per_token = 2 * cfg.num_key_value_heads * head_dim(cfg) * 2 * batch
    total = 0
    for lt in _layer_types(cfg):
        if lt in ("sliding_attention", "chunked_attention"):
            total += per_token * min(n_tokens, cfg.sliding_window - 1)
        else:
            total += per_token * n_tokens
    return total
