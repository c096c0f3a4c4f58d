"""Transformers' own DeepSeek attention modules as references (tests and ``bench/native_v4.py``).

Builds tiny random configs and standalone attention modules of transformers 5.24 (``DeepseekV3Attention``,
``DeepseekV32Attention``, ``DeepseekV4Attention``), with every parameter drawn at random (transformers leaves
``sinks`` / ``position_bias`` uninitialised), and runs them the way their models do: eager attention, the model's
causal (V3/V3.2) or sliding-window (V4) additive mask, and the model's rotary tables.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "tiny_v3_config",
    "tiny_v32_config",
    "tiny_v4_config",
    "hf_attention",
    "hf_prefill",
    "hf_v4_cache",
    "hf_v4_step",
    "hf_v4_cache_from_states",
    "randomize_",
]


def tiny_v3_config(**overrides: Any) -> Any:
    """A small DeepSeek-V3 config: hidden 64, 4 heads, q_lora 32, kv_lora 32, nope 16 + rope 8, v 16."""
    from transformers import DeepseekV3Config

    kw: dict[str, Any] = dict(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
        max_position_embeddings=4096, rope_interleave=True,
    )
    kw.update(overrides)
    cfg = DeepseekV3Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_v32_config(**overrides: Any) -> Any:
    """A small DeepSeek-V3.2 config (V3 shape plus a 16-head, 32-dim lightning indexer, top-k 8)."""
    from transformers import DeepseekV32Config

    kw: dict[str, Any] = dict(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
        max_position_embeddings=4096, index_topk=8, index_head_dim=32, index_n_heads=16,
    )
    kw.update(overrides)
    cfg = DeepseekV32Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_v4_config(kind: str = "compressed_sparse_attention", num_layers: int = 1, **overrides: Any) -> Any:
    """A small DeepSeek-V4 config whose layers are all of ``kind`` (or ``layer_types`` given in ``overrides``).

    Defaults: hidden 64, 4 heads of 32 (8 RoPE dims), q_lora 32, 2 output groups of rank 16, window 8, CSA m=4,
    HCA m'=8, indexer 16 heads of 16 dims, top-k 4.
    """
    from transformers import DeepseekV4Config

    kw: dict[str, Any] = dict(
        vocab_size=64, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2,
        o_lora_rank=16, sliding_window=8, n_routed_experts=4, num_experts_per_tok=2,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        index_n_heads=16, index_head_dim=16, index_topk=4, max_position_embeddings=1 << 20,
        layer_types=[kind] * num_layers, mlp_layer_types=["moe"] * num_layers,
    )
    kw.update(overrides)
    cfg = DeepseekV4Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with N(0, std) (norm weights N(1, std)) so no path hides behind a zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_((noise + base).to(p.dtype))
    return module


def hf_attention(config: Any, layer_idx: int = 0, seed: int = 0) -> torch.nn.Module:
    """The transformers attention module of ``config``'s layer ``layer_idx``, with random weights, in eval mode."""
    mt = config.model_type
    if mt == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention as cls
    elif mt == "deepseek_v32":
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention as cls
    elif mt == "deepseek_v4":
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention as cls
    else:
        raise ValueError(f"not a DeepSeek attention config: {mt}")
    return randomize_(cls(config, layer_idx), seed=seed).eval()


def _rotary(config: Any) -> torch.nn.Module:
    mt = config.model_type
    if mt == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding as cls
    elif mt == "deepseek_v32":
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32RotaryEmbedding as cls
    else:
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding as cls
    return cls(config)


def _additive(allowed: torch.Tensor, dtype: torch.dtype, use_min: bool) -> torch.Tensor:
    fill = torch.finfo(dtype).min if use_min else float("-inf")
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, fill)


@torch.no_grad()
def hf_prefill(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Run a transformers DeepSeek attention module over ``hidden`` [B, S, D] from position 0 without a cache."""
    config = module.config
    b, s, _ = hidden.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    q = torch.arange(s).view(-1, 1)
    k = torch.arange(s).view(1, -1)
    allowed = k <= q
    rotary = _rotary(config)
    if config.model_type == "deepseek_v4":
        allowed = allowed & (k > q - config.sliding_window)
        mask = _additive(allowed, hidden.dtype, use_min=False).expand(b, 1, s, s)
        pe = {t: rotary(hidden, pos, layer_type=t) for t in ("main", "compress")}
        return module(hidden, position_embeddings=pe, position_ids=pos, attention_mask=mask)[0]
    mask = _additive(allowed, hidden.dtype, use_min=True).expand(b, 1, s, s)
    pe = rotary(hidden, pos)
    return module(hidden, position_embeddings=pe, attention_mask=mask, position_ids=pos)[0]


def hf_v4_cache(config: Any) -> Any:
    """transformers' ``DynamicCache`` for a V4 config (sliding + CSA/HCA layers with compressor state)."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


@torch.no_grad()
def hf_v4_step(modules: list[torch.nn.Module], hidden: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
    """Run a stack of transformers V4 attention modules (residual sum between them) over ``hidden`` [B, S, D]
    at positions ``start ..``, with ``cache``; returns the last module's input plus its output."""
    config = modules[0].config
    b, s, _ = hidden.shape
    pos = (torch.arange(s) + start).unsqueeze(0).expand(b, -1)
    q = pos[0].view(-1, 1)
    k = torch.arange(start + s).view(1, -1)
    allowed = (k <= q) & (k > q - config.sliding_window)
    kv_len = min(start, config.sliding_window - 1) + s
    allowed = allowed[:, -kv_len:]
    mask = _additive(allowed, hidden.dtype, use_min=False).expand(b, 1, s, kv_len)
    rotary = _rotary(config)
    pe = {t: rotary(hidden, pos, layer_type=t) for t in ("main", "compress")}
    x = hidden
    for m in modules:
        x = x + m(x, position_embeddings=pe, position_ids=pos, attention_mask=mask, cache=cache)[0]
    return x


@torch.no_grad()
def hf_v4_cache_from_states(config: Any, states: list[Any]) -> Any:
    """A transformers V4 ``DynamicCache`` holding exactly what kvslim's :class:`~kvslim.nn.V4State` s hold.

    Lets a benchmark time transformers' decode at contexts whose transformers prefill would take too long: the
    window (transformers keeps the last W-1 K=V vectors), compressed entries, open-window buffers, overlap carries
    and entry counts are copied over (packed rows are decoded to floats). ``tests/test_nn_deepseek.py`` checks that decoding from it equals
    transformers' own prefill-then-decode.
    """
    cache = hf_v4_cache(config)
    for layer, st in zip(cache.layers, states, strict=True):
        order = torch.argsort(st.win_pos)
        pos = st.win_pos[order]
        ring = st.win_kv if st.kv_codec is None else st.kv_codec.decode(st.win_kv)
        kv = ring[:, order][:, pos >= 0][:, -(config.sliding_window - 1) :]
        kv = kv.unsqueeze(1).contiguous()  # [B, 1, <=W-1, d]
        layer.lazy_initialization(kv, kv)
        layer.keys = kv
        layer.values = kv
        layer.cumulative_length = st.seen
        if not hasattr(layer, "compressed_kv"):
            continue
        for name, cst in (("compressor", st.compressor), ("indexer", st.indexer)):
            if name not in layer.compressed_kv:
                continue
            layer.compressed_kv[name] = cst.read_all(kv.shape[0], 0).clone()
            layer.entry_count[name] = cst.count
            layer.buffer_kv[name] = cst.buf_kv[:, : cst.fill].clone()
            layer.buffer_gate[name] = cst.buf_gate[:, : cst.fill].clone()
            if hasattr(layer, "overlap_kv") and cst.carry_kv is not None:
                layer.overlap_kv[name] = cst.carry_kv.clone()
                layer.overlap_gate[name] = cst.carry_gate.clone()
    return cache
