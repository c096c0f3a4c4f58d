"""Run transformers' whole DeepSeek-V4 model with kvslim's native V4 attention (:class:`~kvslim.nn.V4Attention`).

:func:`use_native_attention` swaps every layer's ``self_attn`` (transformers' ``DeepseekV4Attention``) of a
``DeepseekV4ForCausalLM`` / ``DeepseekV4Model`` for a :class:`NativeV4Attention` adapter around
``from_transformers(self_attn)`` (same weights). Everything else (embeddings, hyper-connections, MoE, norms,
head) stays transformers'. The adapter keeps its decode state in a :class:`V4NativeCache`, a transformers ``Cache``
holding one :class:`~kvslim.nn.V4State` per layer, so ``model(ids, cache=c)`` and ``model.generate(ids, cache=c)``
work as with a stock cache (``past_key_values=`` is transformers' deprecated alias of ``cache=``).

What the patched model needs from transformers, and how it gets it without patching any class:
- masks: kvslim attention needs none (a call continues at ``state.seen``; the window, compressed-entry causality
  and top-k are its own). The model is switched to the attention implementation ``"kvslim_v4"`` (registered under
  that name in ``AttentionInterface`` and ``AttentionMaskInterface``), whose mask function builds nothing (no
  [S, S] mask at long contexts) and refuses a 2-D padding mask with zeros;
- positions: ``cache.get_seq_length()`` is the tokens consumed (``state.seen``), so transformers' default
  ``position_ids`` continue the state; the adapter refuses any ``position_ids`` that do not;
- no cache given: a stateless forward (fresh states, dropped afterwards). The model's config is set
  ``use_cache=False`` because transformers' own ``DynamicCache`` cannot hold kvslim's state; the adapter refuses one.

The model gets its own copy of its config first, so other models built from the same config object are untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from kvslim.errors import InvalidInput
from kvslim.nn.loading import from_transformers
from kvslim.nn.v4_attention import STORAGES, V4Attention, V4State

__all__ = ["use_native_attention", "NativeV4Attention", "V4NativeCache", "V4NativeLayer", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "kvslim_v4"
_WHAT_TO_PASS = "pass cache=kvslim.nn.V4NativeCache(model) (or no cache for a stateless forward)"


def _check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise InvalidInput(f"V4 state storage must be one of {tuple(STORAGES)}, got {storage!r}")


def _attention_not_patched(module: Any, *args: Any, **kwargs: Any) -> Any:
    """Attention function of ``"kvslim_v4"``: only reached by a transformers attention module left unpatched."""
    raise InvalidInput(f"attention implementation {ATTN_IMPLEMENTATION!r} runs only through the modules that "
                       "kvslim.nn.use_native_attention(model) installs; call it on the model instead of setting "
                       "the implementation by hand")


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """Mask function of ``"kvslim_v4"``: kvslim's V4 attention needs no mask; padding (a 0 in the 2-D mask) is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise InvalidInput("kvslim V4 attention has no padding support: the attention mask has padded (0) positions; "
                           "run sequences of equal length without padding (or one sequence per batch)")
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_not_patched)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)


class V4NativeLayer(CacheLayerMixin):
    """One layer of :class:`V4NativeCache`: a :class:`~kvslim.nn.V4State` behind transformers' layer protocol.

    ``get_seq_length`` is the tokens consumed (``state.seen``); ``get_mask_sizes`` mirrors transformers' sliding
    window layer (W - 1 stored tokens); nothing is ever handed back to a stock attention module (``update``
    refuses).
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = True

    def __init__(self, window: int, storage: str = "float") -> None:
        super().__init__()
        _check_storage(storage)
        self.window = window
        self.storage = storage
        self.reset()

    def __repr__(self) -> str:
        return f"V4NativeLayer(seen={self.state.seen}, storage={self.storage!r})"

    def reset(self) -> None:
        self.state = V4State(self.storage)
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise InvalidInput("a V4NativeCache holds kvslim V4 states, not keys/values: use it only with a model "
                           "patched by kvslim.nn.use_native_attention")

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen = self.state.seen
        return min(seen, self.window - 1) + query_length, max(0, seen - self.window + 1)

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return self.state.nbytes()

    def _unsupported(self, what: str) -> None:
        raise InvalidInput(f"V4NativeCache does not support {what} (beam search, several return sequences, "
                           "assisted decoding): use greedy or sampling with one sequence per prompt")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("reordering")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("selecting batch rows")


class V4NativeCache(Cache):
    """A transformers ``Cache`` with one :class:`~kvslim.nn.V4State` per layer, for a model patched by
    :func:`use_native_attention`. ``storage`` is ``"float"`` or ``"v4"`` (packed FP8 / BF16 / FP4 rows, see
    :class:`~kvslim.nn.V4State`); ``None`` takes the one the model was patched with. ``nbytes()`` is the bytes
    the states hold (what :func:`kvslim.cache_nbytes` reports)."""

    def __init__(self, model: nn.Module, storage: str | None = None) -> None:
        core = _core(model)
        attns = [layer.self_attn for layer in core.layers]
        if not all(isinstance(a, NativeV4Attention) for a in attns):
            raise InvalidInput("V4NativeCache needs a model patched by kvslim.nn.use_native_attention(model)")
        storage = storage if storage is not None else attns[0].storage
        super().__init__(layers=[V4NativeLayer(core.config.sliding_window, storage) for _ in attns])

    @property
    def states(self) -> list[V4State]:
        """The per-layer kvslim states (layer order)."""
        return [layer.state for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class NativeV4Attention(nn.Module):
    """transformers' ``DeepseekV4Attention`` interface around a kvslim :class:`~kvslim.nn.V4Attention`.

    ``forward(hidden_states [B, S, D], position_embeddings, position_ids [B or 1, S], attention_mask, cache)``
    -> ``(output [B, S, D], None)``. RoPE tables are kvslim's own (copied from transformers by
    ``from_transformers``), so ``position_embeddings`` is ignored; ``position_ids`` must continue the layer's state.
    """

    def __init__(self, native: V4Attention, layer_idx: int, storage: str = "float") -> None:
        super().__init__()
        _check_storage(storage)
        self.native = native
        self.layer_idx = layer_idx
        self.storage = storage

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, kind={self.native.config.kind}, storage={self.storage!r}"

    def _state(self, cache: Any) -> V4State:
        if cache is None:
            return self.native.new_state(self.storage)
        if not isinstance(cache, V4NativeCache):
            raise InvalidInput(f"kvslim V4 attention keeps its state in a V4NativeCache, got {type(cache).__name__}; "
                               + _WHAT_TO_PASS)
        if self.layer_idx >= len(cache.layers):
            raise InvalidInput(f"V4NativeCache has {len(cache.layers)} layers, the model more; " + _WHAT_TO_PASS)
        return cache.layers[self.layer_idx].state

    @staticmethod
    def _check(state: V4State, hidden: torch.Tensor, position_ids: torch.Tensor | None, mask: Any) -> None:
        b, s = hidden.shape[:2]
        if mask is not None:
            raise InvalidInput("kvslim V4 attention takes no attention mask tensor (it has its own window and "
                               f"causality, and no padding support); this model's attention implementation must stay "
                               f"{ATTN_IMPLEMENTATION!r}")
        if state.win_kv is not None and state.win_kv.shape[0] != b:
            raise InvalidInput(f"batch of {b} sequences given to a cache holding {state.win_kv.shape[0]}; use one "
                               "V4NativeCache per batch")
        if position_ids is None:
            return
        want = torch.arange(state.seen, state.seen + s, device=position_ids.device)
        if position_ids.shape[-1] != s or not bool((position_ids == want).all()):
            got = position_ids.reshape(-1, position_ids.shape[-1])[:, [0, -1]].tolist()
            raise InvalidInput(f"position_ids must continue the cache: expected {state.seen}..{state.seen + s - 1} "
                               f"for every sequence, got first..last {got}; kvslim V4 attention supports no gaps, "
                               "restarts or per-sequence offsets")

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                position_ids: torch.Tensor | None = None, attention_mask: Any = None, cache: Cache | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        state = self._state(cache)
        self._check(state, hidden_states, position_ids, attention_mask)
        return self.native(hidden_states, state), None


def _core(model: nn.Module) -> nn.Module:
    """The ``DeepseekV4Model`` of a ``DeepseekV4ForCausalLM`` (or the model itself)."""
    name = type(model).__name__
    if name == "DeepseekV4ForCausalLM":
        return model.model
    if name == "DeepseekV4Model":
        return model
    raise InvalidInput(f"expected a transformers DeepseekV4ForCausalLM or DeepseekV4Model, got {name}")


def _own_config(model: nn.Module) -> Any:
    """Give ``model`` (and every submodule sharing its config object) a private copy of that config."""
    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    return new


def use_native_attention(model: nn.Module, storage: str = "float") -> nn.Module:
    """Replace every ``DeepseekV4Attention`` of ``model`` with kvslim's native V4 attention (same weights), in place.

    ``model``: a transformers ``DeepseekV4ForCausalLM`` or ``DeepseekV4Model``. ``storage``: default row storage of
    the states (``"float"``: the module's dtype, equal to transformers; ``"v4"``: packed FP8 / BF16 / FP4 rows).
    Returns ``model``. Use ``model(ids, cache=V4NativeCache(model))`` / ``model.generate(ids,
    cache=V4NativeCache(model))`` to decode; without a cache a forward is stateless.
    """
    _check_storage(storage)
    core = _core(model)
    attns = [layer.self_attn for layer in core.layers]
    kinds = {type(a).__name__ for a in attns}
    if kinds != {"DeepseekV4Attention"}:
        already = "already uses kvslim attention" if "NativeV4Attention" in kinds else f"has attention {sorted(kinds)}"
        raise InvalidInput(f"use_native_attention: the model {already}; pass a stock transformers DeepSeek-V4 model")
    natives = [from_transformers(a) for a in attns]  # reads the original config before anything changes
    _register()
    config = _own_config(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    config.use_cache = False
    for i, (layer, native) in enumerate(zip(core.layers, natives, strict=True)):
        layer.self_attn = NativeV4Attention(native, i, storage)
    return model
