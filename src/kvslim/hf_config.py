"""The one reader of transformers configs: attention facts of a causal LM, and the bytes of its 16-bit full cache.

Every part of kvslim that needs heads, head dims, layer types or windows of a Hugging Face model reads them here
(``kvslim.models.describe``, the planner's ``from_config``, the compressed caches, generation and the evaluation).
Field names follow transformers 5.24; a multimodal config contributes its text config. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_LAYERS", "AttentionFacts", "check_layers", "full16_nbytes", "read", "text_config"]

LOCAL_TYPES = ("sliding_attention", "chunked_attention")
MAX_LAYERS = 10_000  # published models have under 200 layers; kvslim builds one object per layer


def check_layers(n: Any, what: str = "this config") -> None:
    """Refuse a layer count above :data:`MAX_LAYERS` (``num_hidden_layers: 1e11`` would build a list of 1e11 layer
    types: a MemoryError, or minutes at 1e7) with one line, before anything is built per layer."""
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_LAYERS:
        from .errors import InvalidInput

        raise InvalidInput(f"{what} has num_hidden_layers = {n:,}: kvslim plans at most {MAX_LAYERS:,} layers "
                           "(published models have under 200); check the config")  # fmt: skip


def text_config(config: Any) -> Any:
    """The text config of ``config`` (itself for text-only models); a model is accepted for its ``.config``."""
    cfg = getattr(config, "config", config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@dataclass(frozen=True)
class AttentionFacts:
    """What a stock attention layer stack is: ``layer_types`` per layer (transformers' names), query and KV heads,
    head dim, the local window of sliding layers (None without), hidden size and maximum context."""

    model_type: str
    layer_types: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    sliding_window: int | None
    max_context: int

    @property
    def n_layers(self) -> int:
        return len(self.layer_types)


def read(config: Any) -> AttentionFacts:
    """Facts of a transformers config or model. ``layer_types`` as transformers' caches infer them: the config's
    own list, else sliding for every layer when ``sliding_window`` is set, chunked with ``attention_chunk_size``."""
    cfg = text_config(config)
    heads = int(cfg.num_attention_heads)
    n = int(cfg.num_hidden_layers)
    check_layers(n, f"this {getattr(cfg, 'model_type', '') or 'model'} config")
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "full_attention"
        if window is not None:
            kind = "sliding_attention"
        elif getattr(cfg, "attention_chunk_size", None) is not None:
            kind = "chunked_attention"
        types = [kind] * n
    return AttentionFacts(
        model_type=str(getattr(cfg, "model_type", "")),
        layer_types=tuple(types),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        hidden_size=int(cfg.hidden_size),
        sliding_window=None if window is None else int(window),
        max_context=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )


def full16_nbytes(config: Any, n_tokens: int, batch: int = 1) -> int:
    """Bytes a 16-bit transformers ``DynamicCache`` holds after ``n_tokens`` tokens (K and V): every token in full
    layers, the last ``sliding_window - 1`` in sliding layers, as ``DynamicSlidingWindowLayer`` keeps them."""
    f = read(config)
    per_token = 2 * f.kv_heads * f.head_dim * 2 * batch
    total = 0
    for lt in f.layer_types:
        held = min(n_tokens, f.sliding_window - 1) if lt in LOCAL_TYPES and f.sliding_window else n_tokens
        total += per_token * held
    return total
