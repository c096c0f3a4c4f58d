"""ArchSpecs from Hugging Face configs (llama, qwen2, gemma3 / gemma3_text, deepseek_v3, deepseek_v32, deepseek_v4).

``spec_from_config`` takes a transformers config object, a ``config.json`` dict, or a path to ``config.json`` or to
a model folder. Field names follow transformers 5.24 (``models/<type>/configuration_<type>.py``); a dict goes
through transformers' own config class first, so its defaults and legacy-field folding (V4 ``compress_ratios``)
apply. Other model types raise ``InvalidInput``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InvalidInput
from .hf_config import read
from .spec import ArchSpec, GQALayer, IndexerSpec, MLALayer, MLPSpec, V4Layer

__all__ = ["SUPPORTED_MODEL_TYPES", "from_config", "spec_from_config"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma3", "gemma3_text", "deepseek_v3", "deepseek_v32", "deepseek_v4")


def _load(config: Any) -> Any:
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InvalidInput(f"{path} does not exist: give a config.json file or a model folder holding one")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidInput(_unsupported(model_type))
        from transformers import AutoConfig

        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        return AutoConfig.for_model(model_type, **kwargs)
    return config


def _unsupported(model_type: Any) -> str:
    return (
        f"model type {model_type!r} is not supported by the planner: supported types are "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}; build an ArchSpec by hand for others"
    )


def _name(cfg: Any, default: str) -> str:
    return str(getattr(cfg, "_name_or_path", "") or default)


def _gqa_spec(cfg: Any) -> ArchSpec:
    f = read(cfg)
    n, heads, kv, head_dim, window = f.n_layers, f.heads, f.kv_heads, f.head_dim, f.sliding_window
    layers = []
    for t in f.layer_types:
        if t == "sliding_attention":
            layers.append(GQALayer(heads, kv, head_dim, window=int(window)))
        elif t == "full_attention":
            layers.append(GQALayer(heads, kv, head_dim))
        else:
            raise InvalidInput(f"layer type {t!r} of a {cfg.model_type} config is not supported by the planner")
    mlps = (MLPSpec(int(cfg.intermediate_size)),) * n
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    return ArchSpec(_name(cfg, cfg.model_type), int(cfg.hidden_size), int(cfg.vocab_size), tuple(layers), mlps,
                    int(cfg.max_position_embeddings), tie)  # fmt: skip


def _moe(cfg: Any) -> MLPSpec:
    return MLPSpec(int(cfg.moe_intermediate_size), int(cfg.n_routed_experts), int(cfg.num_experts_per_tok),
                   int(cfg.n_shared_experts or 0))  # fmt: skip


def _deepseek_v3_spec(cfg: Any) -> ArchSpec:
    n = int(cfg.num_hidden_layers)
    ix = None
    if cfg.model_type == "deepseek_v32":
        ix = IndexerSpec(int(cfg.index_n_heads), int(cfg.index_head_dim), int(cfg.index_topk))
    layer = MLALayer(int(cfg.num_attention_heads), int(cfg.kv_lora_rank), int(cfg.qk_nope_head_dim),
                     int(cfg.qk_rope_head_dim), int(cfg.v_head_dim), int(cfg.q_lora_rank or 0), ix)  # fmt: skip
    mlp_types = getattr(cfg, "mlp_layer_types", None)
    if mlp_types is None:
        k = int(cfg.first_k_dense_replace or 0)
        mlp_types = ["dense"] * min(k, n) + ["sparse"] * max(0, n - k)
    dense, moe = MLPSpec(int(cfg.intermediate_size)), _moe(cfg)
    mlps = tuple(moe if t == "sparse" else dense for t in mlp_types)
    return ArchSpec(_name(cfg, cfg.model_type), int(cfg.hidden_size), int(cfg.vocab_size), (layer,) * n, mlps,
                    int(cfg.max_position_embeddings), bool(cfg.tie_word_embeddings))  # fmt: skip


_V4_KIND = {"sliding_attention": "swa", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}


def _deepseek_v4_spec(cfg: Any) -> ArchSpec:
    ix = IndexerSpec(int(cfg.index_n_heads), int(cfg.index_head_dim), int(cfg.index_topk))
    rates = dict(cfg.compress_rates)
    layers = []
    for t in cfg.layer_types:
        kind = _V4_KIND[t]
        layers.append(
            V4Layer(kind, int(cfg.num_attention_heads), int(cfg.head_dim), int(cfg.qk_rope_head_dim),
                    int(cfg.sliding_window), int(rates.get(t, 0)), int(cfg.q_lora_rank), int(cfg.o_groups),
                    int(cfg.o_lora_rank), ix if kind == "csa" else None)  # fmt: skip
        )
    mlps = (_moe(cfg),) * len(layers)
    return ArchSpec(_name(cfg, cfg.model_type), int(cfg.hidden_size), int(cfg.vocab_size), tuple(layers), mlps,
                    int(cfg.max_position_embeddings), bool(cfg.tie_word_embeddings))  # fmt: skip


def spec_from_config(config: Any) -> ArchSpec:
    """An ArchSpec from a transformers config, a config dict or a path (see the module docstring)."""
    cfg = _load(config)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    model_type = getattr(cfg, "model_type", None)
    if model_type in ("llama", "qwen2", "gemma3", "gemma3_text"):
        return _gqa_spec(cfg)
    if model_type in ("deepseek_v3", "deepseek_v32"):
        return _deepseek_v3_spec(cfg)
    if model_type == "deepseek_v4":
        return _deepseek_v4_spec(cfg)
    raise InvalidInput(_unsupported(model_type))


def from_config(config: Any) -> ArchSpec:
    """An ArchSpec from a transformers config object, a config dict, or a path to ``config.json`` / a model folder."""
    return spec_from_config(config)
