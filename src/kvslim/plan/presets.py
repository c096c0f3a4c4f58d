"""Named architecture presets for the planner (DeepSeek V3 / V3.2 / V4, Llama 3.1, Qwen 2.5, the embedded models).

Sources: DeepSeek shapes from ``/work/shared/reference/deepseek-attention.md`` (official configs and code; V4-Pro
from transcriptions of its config.json that agree with transformers' V4 docstrings); Llama / Qwen from their
published ``config.json``; the embedded models' presets are checked against their loaded configs by the tests.
MTP / next-token-prediction layers are left out of every preset.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidInput
from .spec import ArchSpec, GQALayer, IndexerSpec, MLALayer, MLPSpec, V4Layer

__all__ = ["PRESETS", "get_preset", "preset", "preset_names", "resolve_spec"]


def _gqa(name: str, *, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int,
         ctx: int, tie: bool = False, notes: str = "") -> ArchSpec:  # fmt: skip
    layer = GQALayer(heads, kv, head_dim)
    return ArchSpec(name, hidden, vocab, (layer,) * layers, (MLPSpec(inter),) * layers, ctx, tie, notes)


def _deepseek_v3(name: str, indexed: bool) -> ArchSpec:
    ix = IndexerSpec(n_heads=64, head_dim=128, topk=2048) if indexed else None
    layer = MLALayer(128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     q_lora_rank=1536, indexer=ix)  # fmt: skip
    mlps = (MLPSpec(18432),) * 3 + (MLPSpec(2048, n_routed=256, top_k=8, n_shared=1),) * 58
    notes = "config.json max_position_embeddings 163840 (the model card says 128K); MTP layer omitted"
    return ArchSpec(name, 7168, 129280, (layer,) * 61, mlps, 163840, False, notes)


def _deepseek_v4(name: str, *, pro: bool) -> ArchSpec:
    hidden, heads, q_lora, groups, topk = (7168, 128, 1536, 16, 1024) if pro else (4096, 64, 1024, 8, 512)
    n = 61 if pro else 43
    first = "hca" if pro else "swa"  # L0-L1: Pro HCA, Flash SWA-only; then CSA on even, HCA on odd layers
    kinds = [first, first] + ["csa" if i % 2 == 0 else "hca" for i in range(2, n)]
    rate = {"swa": 0, "csa": 4, "hca": 128}
    ix = IndexerSpec(n_heads=64, head_dim=128, topk=topk)
    layers = tuple(
        V4Layer(k, heads, 512, 64, 128, rate[k], q_lora, groups, 1024, ix if k == "csa" else None) for k in kinds
    )
    mlp = MLPSpec(3072, 384, 6, 1) if pro else MLPSpec(2048, 256, 6, 1)
    notes = "MTP layer and mHC hyper-connection mixing omitted; " + (
        "config from third-party transcriptions of config.json" if pro else "config.json of V4-Flash"
    )
    return ArchSpec(name, hidden, 129280, layers, (mlp,) * n, 1048576, False, notes)


def _gemma3_270m() -> ArchSpec:
    kinds = [GQALayer(4, 1, 256, window=512)] * 5 + [GQALayer(4, 1, 256)]
    return ArchSpec("gemma3-270m", 640, 262144, tuple(kinds * 3), (MLPSpec(2048),) * 18, 32768, True,
                    "Gemma 3 270M: 5 local (sliding 512) : 1 global layers, MQA")  # fmt: skip


PRESETS: dict[str, Callable[[], ArchSpec]] = {
    "deepseek-v3": lambda: _deepseek_v3("deepseek-v3", indexed=False),
    "deepseek-v3.2": lambda: _deepseek_v3("deepseek-v3.2", indexed=True),
    "deepseek-v4-flash": lambda: _deepseek_v4("deepseek-v4-flash", pro=False),
    "deepseek-v4-pro": lambda: _deepseek_v4("deepseek-v4-pro", pro=True),
    "llama-3.1-8b": lambda: _gqa("llama-3.1-8b", hidden=4096, inter=14336, layers=32, heads=32, kv=8,
                                 head_dim=128, vocab=128256, ctx=131072),  # fmt: skip
    "llama-3.1-70b": lambda: _gqa("llama-3.1-70b", hidden=8192, inter=28672, layers=80, heads=64, kv=8,
                                  head_dim=128, vocab=128256, ctx=131072),  # fmt: skip
    "qwen2.5-7b": lambda: _gqa("qwen2.5-7b", hidden=3584, inter=18944, layers=28, heads=28, kv=4, head_dim=128,
                               vocab=152064, ctx=131072, notes="q/k/v biases not counted"),  # fmt: skip
    "gemma3-270m": _gemma3_270m,
    "smollm2-135m": lambda: _gqa("smollm2-135m", hidden=576, inter=1536, layers=30, heads=9, kv=3, head_dim=64,
                                 vocab=49152, ctx=8192, tie=True),  # fmt: skip
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ArchSpec:
    """The preset called ``name``; an unknown name raises ``InvalidInput`` with the closest known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        close = difflib.get_close_matches(name.lower(), PRESETS, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise InvalidInput(
            f"unknown model {name!r}: {hint}presets are {', '.join(PRESETS)} (or give a config.json path)"
        ) from None


preset = get_preset  # kvslim.preset(name)


def resolve_spec(name_or_path: str) -> ArchSpec:
    """A preset by name, else the spec of a ``config.json`` file or a model folder; unknown names suggest presets."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.endswith(".json") or "/" in name_or_path:
        from .spec_hf import spec_from_config  # a leaf: spec_hf never imports presets

        return spec_from_config(path)
    return get_preset(name_or_path)
