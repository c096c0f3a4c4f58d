"""Tiny random-weight models for tests and benchmarks (built from configs, nothing downloaded).

``tiny_llama()`` is a 2-layer GQA Llama; ``tiny_gemma3()`` a Gemma 3 with sliding (local) and full (global) layers
and MQA. Both are deterministic for a given seed and run in float32 on the CPU in milliseconds.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_llama", "tiny_gemma3", "tiny_model"]


def _build(config: Any, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A random 2-layer Llama: hidden 64, 4 query heads, 2 KV heads (GQA), head dim 16, vocab 128."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    kw.update(overrides)
    return _build(LlamaConfig(**kw), seed)


def tiny_gemma3(seed: int = 0, **overrides: Any) -> Any:
    """A random Gemma 3 text model: 4 layers (3 sliding with window 16, then 1 full), 4 query heads, 1 KV head."""
    from transformers import Gemma3TextConfig

    kw: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa",
    )
    kw.update(overrides)
    return _build(Gemma3TextConfig(**kw), seed)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """``tiny_model("llama" | "gemma3")``."""
    builders = {"llama": tiny_llama, "gemma3": tiny_gemma3}
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(builders)}")
    return builders[arch](seed=seed, **overrides)
