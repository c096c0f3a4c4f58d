"""The ``kvslim`` attention function and mask function, registered with transformers under kvslim's own name.

Stock attention (sdpa/eager) reads one contiguous K/V per layer with one mask shared by all layers of a type; a
kvslim cache holds a different layout per layer (sinks, pooled entries, a window), so the model runs with
``attn_implementation="kvslim"``:

* the mask function returns a :class:`KvslimMask` carrying the 2-D padding mask (and, lazily, the stock sdpa mask
  for layers that are not kvslim layers);
* the attention function finds the kvslim layer that produced ``key`` and lets it store, pool and attend
  (:meth:`kvslim.cache.layer.KvslimLayer.attend`); for any other cache it runs transformers' own sdpa.

Registration happens on first use (no import-time side effects) and only adds the name ``kvslim``.
``use_kvslim_attention(model)`` switches one model and restores its previous implementation on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .registry import layer_for

__all__ = ["ATTN_NAME", "KvslimMask", "ensure_registered", "kvslim_attention", "kvslim_mask", "use_kvslim_attention"]

ATTN_NAME = "kvslim"


class KvslimMask:
    """What the mask function hands to attention: the 2-D padding mask ``[b, seen]`` (bool, or None) and the
    arguments to build transformers' own sdpa mask when a layer is not a kvslim layer."""

    def __init__(self, padding: torch.Tensor | None, sdpa_args: dict[str, Any]) -> None:
        self.padding = padding
        self._sdpa_args = sdpa_args

    def materialize(self) -> torch.Tensor | None:
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self._sdpa_args)


def kvslim_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Any = None, attention_mask: torch.Tensor | None = None, **kwargs: Any,
) -> KvslimMask:
    """Mask function registered as ``kvslim`` (same signature as ``masking_utils.sdpa_mask``)."""
    args = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, **kwargs,
    )
    if mask_function is not None:
        args["mask_function"] = mask_function
    padding = None
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        padding = attention_mask.to(torch.bool)
    return KvslimMask(padding, args)


def kvslim_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``kvslim``: ``query [b, hq, q, d]`` -> ``([b, q, hq, d], None)``."""
    layer = layer_for(key)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = attention_mask.materialize() if isinstance(attention_mask, KvslimMask) else attention_mask
        kwargs.pop("sliding_window", None)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    q = query.shape[2]
    valid_new = None
    if isinstance(attention_mask, KvslimMask) and attention_mask.padding is not None:
        valid_new = attention_mask.padding[:, -q:]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    out = layer.attend(query, kwargs.get("position_ids"), valid_new, scaling, softcap)
    return out, None


def ensure_registered() -> None:
    """Register ``kvslim`` with transformers' attention and mask interfaces (idempotent; adds only that name)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, kvslim_attention)
    if ATTN_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTN_NAME, kvslim_mask)


def current_attn(model: Any) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def switch_attention(model: Any, name: str | None) -> None:
    if name is not None and current_attn(model) != name:
        model.set_attn_implementation(name)


@contextlib.contextmanager
def use_kvslim_attention(model: Any) -> Iterator[Any]:
    """Run ``model`` with the kvslim attention inside the block; its previous implementation is restored after."""
    ensure_registered()
    previous = current_attn(model)
    switch_attention(model, ATTN_NAME)
    try:
        yield model
    finally:
        switch_attention(model, previous)
