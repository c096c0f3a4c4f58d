"""Build kvslim's native module from a transformers DeepSeek attention module, with the same weights.

``from_transformers(m)`` accepts ``DeepseekV3Attention`` (-> :class:`~kvslim.nn.MLA`), ``DeepseekV32Attention``
(-> :class:`~kvslim.nn.DSA`) and ``DeepseekV4Attention`` (-> :class:`~kvslim.nn.V4Attention`). Shapes come from
``m.config`` (and ``m.layer_idx`` for V4's layer kind); RoPE tables (YaRN included) are copied from transformers'
own rotary classes; the softmax scale is ``m.scaling``. Weights are copied (``load_state_dict(strict=True)``), so
the two modules share nothing afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from kvslim.errors import InvalidInput
from kvslim.nn._common import Rotary

__all__ = ["from_transformers"]


def _mla_kwargs(c: Any, scaling: float) -> dict[str, Any]:
    return dict(
        hidden_size=c.hidden_size, num_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, rope_interleave=bool(getattr(c, "rope_interleave", True)),
        attention_bias=bool(getattr(c, "attention_bias", False)), softmax_scale=float(scaling),
    )


def _v4_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in module.state_dict().items():
        if key.startswith("compressor.indexer.scorer."):
            key = "indexer." + key[len("compressor.indexer.scorer."):]
        elif key.startswith("compressor.indexer.q_b_proj."):
            key = "indexer." + key[len("compressor.indexer."):]
        elif key.startswith("compressor.indexer."):
            key = "indexer.compressor." + key[len("compressor.indexer."):]
        out[key] = value
    return out


def from_transformers(module: torch.nn.Module) -> torch.nn.Module:
    """The kvslim module equal to a transformers DeepSeek attention module (same weights, same outputs)."""
    name = type(module).__name__
    config = getattr(module, "config", None)
    if name == "DeepseekV3Attention":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

        from kvslim.nn.mla import MLA, MLAConfig

        rot = DeepseekV3RotaryEmbedding(config)
        ours = MLA(MLAConfig(**_mla_kwargs(config, module.scaling)), Rotary(rot.inv_freq, rot.attention_scaling))
        state = module.state_dict()
    elif name == "DeepseekV32Attention":
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32RotaryEmbedding

        from kvslim.nn.dsa import DSA, DSAConfig

        rot = DeepseekV32RotaryEmbedding(config)
        cfg = DSAConfig(**_mla_kwargs(config, module.scaling), index_n_heads=config.index_n_heads,
                        index_head_dim=config.index_head_dim, index_topk=config.index_topk)
        ours = DSA(cfg, Rotary(rot.inv_freq, rot.attention_scaling))
        state = module.state_dict()
    elif name == "DeepseekV4Attention":
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        from kvslim.nn.v4_attention import V4Attention
        from kvslim.nn.v4_config import V4Config

        rot = DeepseekV4RotaryEmbedding(config)
        main = Rotary(rot.main_inv_freq, rot.main_attention_scaling)
        compress = Rotary(rot.compress_inv_freq, rot.compress_attention_scaling)
        ours = V4Attention(V4Config.from_hf(config, module.layer_idx), main, compress)
        state = _v4_state_dict(module)
    else:
        raise InvalidInput(f"from_transformers: {name} is not a DeepSeek V3 / V3.2 / V4 attention module; pass "
                           "e.g. model.model.layers[i].self_attn of a DeepSeek model")
    ours.load_state_dict(state, strict=True)
    device = next(module.parameters()).device
    ours.to(device)
    with torch.no_grad():  # each parameter keeps its source's dtype (V4 keeps norms, sinks, biases in fp32)
        for name, p in ours.named_parameters():
            p.data = p.data.to(state[name].dtype)
    return ours.eval()  # RoPE tables stay fp32 like transformers'; tested in fp32
