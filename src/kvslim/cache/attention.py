"""The ``kvslim`` attention and mask functions, registered with transformers under kvslim's own names.

Stock attention (sdpa/eager) reads one contiguous K/V per layer with one mask shared by all layers of a type; a
kvslim cache holds a different layout per layer (sinks, pooled entries, a window), so a model holding a kvslim cache
runs with ``attn_implementation="kvslim"`` (an sdpa model) or ``"kvslim_eager"`` (an eager model):

* the mask function returns a :class:`KvslimMask` carrying the 2-D padding mask and, built on first use, exactly the
  mask the stock implementation would have built (``sdpa_mask`` / ``eager_mask`` with the same arguments);
* the attention function finds the kvslim layer that produced ``key`` and lets it store, pool and attend
  (:meth:`kvslim.cache.base.BaseLayer.attend`); for any other cache it calls the stock function (transformers' sdpa,
  or the model's own eager function) with that stock mask, so the model computes bit-identically what it computed
  before: building a kvslim cache changes nothing for other caches and nothing needs restoring.

Registration happens on first use (no import-time side effects) and only adds kvslim's own names.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import torch

from ..errors import InvalidInput
from .registry import layer_for
from .tap import TAP

__all__ = ["ATTN_NAME", "EAGER_NAME", "KvslimMask", "ensure_registered", "kvslim_attention", "kvslim_mask",
           "select_kvslim_attention"]  # fmt: skip

ATTN_NAME = "kvslim"
EAGER_NAME = "kvslim_eager"
_STOCK = {ATTN_NAME: "sdpa", EAGER_NAME: "eager"}  # kvslim name -> the stock implementation it falls back to
_KVSLIM_FOR = {"sdpa": ATTN_NAME, "eager": EAGER_NAME, ATTN_NAME: ATTN_NAME, EAGER_NAME: EAGER_NAME}


class KvslimMask:
    """What the mask function hands to attention: the 2-D padding mask ``[b, seen]`` (bool, or None) and the
    arguments of the stock mask, built once on first use for layers that are not kvslim layers."""

    def __init__(self, padding: torch.Tensor | None, stock: str, args: dict[str, Any]) -> None:
        self.padding = padding
        self._stock, self._args = stock, args
        self._built = False
        self._mask: Any = None

    def materialize(self) -> Any:
        if not self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            self._mask = ALL_MASK_ATTENTION_FUNCTIONS[self._stock](**self._args)
            self._built = True
        return self._mask


def kvslim_mask(batch_size: int, q_length: int, kv_length: int, *args: Any, stock: str = "sdpa",
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> KvslimMask:  # fmt: skip
    """Mask function registered as ``kvslim`` / ``kvslim_eager`` (same signature as ``masking_utils.sdpa_mask``)."""
    if args:
        raise TypeError("kvslim_mask takes its arguments by keyword after kv_length, as transformers passes them")
    full = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)
    padding = None
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        padding = attention_mask.to(torch.bool)
    return KvslimMask(padding, stock, full)


def _stock_attention(stock: str, module: Any) -> Any:
    if stock == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager attention


def kvslim_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None, *, stock: str = "sdpa",
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Attention function registered as ``kvslim`` / ``kvslim_eager``: ``query [b, hq, q, d]`` ->
    ``([b, q, hq, d], weights or None)``."""
    layer = layer_for(key)
    if layer is None:
        mask = attention_mask.materialize() if isinstance(attention_mask, KvslimMask) else attention_mask
        if softcap is not None:
            kwargs["softcap"] = softcap
        return _stock_attention(stock, module)(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                               **kwargs)  # fmt: skip
    q = query.shape[2]
    valid_new = None
    if isinstance(attention_mask, KvslimMask) and attention_mask.padding is not None:
        valid_new = attention_mask.padding[:, -q:]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    positions = kwargs.get("position_ids")
    out = layer.attend(query, positions, valid_new, scaling, softcap)
    tap = TAP.get()
    if tap is not None:
        tap.on_attend(layer, query, positions, valid_new, scaling, softcap, out)
    return out, None


def ensure_registered() -> None:
    """Register kvslim's attention and mask functions (idempotent; adds only kvslim's names)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for name, stock in _STOCK.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, partial(kvslim_attention, stock=stock))
        if name not in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, partial(kvslim_mask, stock=stock))


def current_attn(model: Any) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def kvslim_name_for(model: Any) -> str:
    """The kvslim implementation name for ``model`` (``InvalidInput`` when its attention is neither sdpa nor eager)."""
    current = current_attn(model)
    if current not in _KVSLIM_FOR:
        raise InvalidInput(f"kvslim caches run on models with sdpa or eager attention; this model uses {current!r} "
                           "(load it with attn_implementation='sdpa')")  # fmt: skip
    return _KVSLIM_FOR[current]


def select_kvslim_attention(model: Any) -> None:
    """Select kvslim's attention on ``model`` (a no-op when selected): for every cache that is not a kvslim cache it
    runs the model's previous stock attention exactly, so this changes nothing else the model computes."""
    name = kvslim_name_for(model)
    ensure_registered()
    if current_attn(model) != name:
        model.set_attn_implementation(name)
