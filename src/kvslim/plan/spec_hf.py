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

from ..errors import InvalidInput
from ..hf_config import check_layers, read
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
            config = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{path} is not UTF-8 text (byte {exc.start}): give a config.json file") from None
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        except OSError as exc:
            raise InvalidInput(f"{path} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(config, dict):
            raise InvalidInput(f"{path} holds a JSON {type(config).__name__}, not a config object")
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidInput(_unsupported(model_type))
        _check_fields(config, model_type)
        from transformers import AutoConfig

        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except Exception as exc:  # transformers' own validation of the fields: one line, not its traceback
            raise InvalidInput(f"this {model_type} config is not valid: {_first_line(exc)}") from None
    return config


_CORE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def _check_fields(config: dict[str, Any], model_type: str) -> None:
    """Refuse a config dict without ``num_hidden_layers`` (e.g. only ``model_type``), which would be planned silently
    with transformers' defaults; warn naming the other core fields that fall back to those defaults."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for k in (*_CORE_FIELDS, "intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = text.get(k, config.get(k))
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidInput(f"this {model_type} config has {k} = {v!r}: it must be a positive whole number")
    check_layers(text.get("num_hidden_layers", config.get("num_hidden_layers")), f"this {model_type} config")
    missing = [k for k in _CORE_FIELDS if k not in text and k not in config]
    if "num_hidden_layers" in missing:
        raise InvalidInput(
            f"this {model_type} config lacks {', '.join(missing)}: it does not describe a model (the planner would "
            "silently use transformers' defaults); give a model's complete config.json"
        )
    if missing:
        import warnings

        from ..errors import KvslimWarning

        warnings.warn(f"this {model_type} config lacks {', '.join(missing)}: planning with transformers' "
                      f"{model_type} defaults for them", KvslimWarning, stacklevel=3)  # fmt: skip


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
    if heads < 1 or kv < 1 or heads % kv:
        raise InvalidInput(f"this {cfg.model_type} config has {heads} query heads over {kv} KV heads: grouped-query "
                           "attention needs num_attention_heads to be a multiple of num_key_value_heads")  # fmt: skip
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
    build = {"llama": _gqa_spec, "qwen2": _gqa_spec, "gemma3": _gqa_spec, "gemma3_text": _gqa_spec,
             "deepseek_v3": _deepseek_v3_spec, "deepseek_v32": _deepseek_v3_spec, "deepseek_v4": _deepseek_v4_spec}
    if model_type not in build:
        raise InvalidInput(_unsupported(model_type))
    try:
        return build[model_type](cfg)
    except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"this {model_type} config cannot be planned: a field is missing or has a wrong value "
                           f"({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The error's message on one line: its lines joined (transformers' validation errors put the reason on the
    lines after a heading that ends with ':'), cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def from_config(config: Any) -> ArchSpec:
    """An ArchSpec from a transformers config object, a config dict, or a path to ``config.json`` / a model folder."""
    return spec_from_config(config)
