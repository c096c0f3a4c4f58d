"""Per-layer specs (hand-computed streams, attended entries, FLOPs), closed-form sums, presets, HF configs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvslim.errors import InvalidInput
from kvslim.plan.presets import PRESETS, get_preset, preset, resolve_spec
from kvslim.plan.spec import (
    GQALayer,
    IndexerSpec,
    MLALayer,
    V4Layer,
    sum_floor,
    sum_min,
    sum_min_floor,
)
from kvslim.plan.spec_hf import from_config

V3 = dict(n_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536)
IX = IndexerSpec(64, 128, 2048)


def test_gqa_kinds_and_streams() -> None:
    assert GQALayer(8, 8, 64).kind == "mha"
    assert GQALayer(8, 2, 64).kind == "gqa"
    assert GQALayer(8, 1, 64).kind == "mqa"
    assert GQALayer(8, 1, 64, window=512).kind == "sliding(512)"
    layer = GQALayer(4, 2, 16)
    (k, v) = layer.streams(10)
    assert (k.dim, k.count, k.heads, k.role) == (16, 10, 2, "key")
    assert (v.dim, v.count, v.heads, v.role) == (16, 10, 2, "value")
    assert layer.core_flops(10) == 2 * 4 * 10 * 32
    assert layer.proj_params(64) == 64 * (64 + 2 * 32) + 64 * 64
    sliding = GQALayer(4, 2, 16, window=8, sinks=2)
    assert sliding.stored_tokens(5) == 5 and sliding.stored_tokens(100) == 10
    assert GQALayer(4, 4, 16, v_head_dim=8).streams(3)[1].dim == 8


def test_mla_and_dsa_by_hand() -> None:
    mla, dsa = MLALayer(**V3), MLALayer(**V3, indexer=IX)
    assert mla.kind == "mla" and dsa.kind == "dsa"
    assert [(s.component, s.dim, s.count) for s in dsa.streams(1000)] == [("kv", 576, 1000), ("index", 128, 1000)]
    assert mla.core_flops(1000) == 2 * 128 * 1000 * (576 + 512)  # absorbed MQA mode
    assert mla.core_flops(1000, absorbed=False) == 2 * 128 * 1000 * (192 + 128)  # MHA mode
    assert dsa.attended(4096) == {"kv": 2048, "index": 4096}
    assert dsa.core_flops(4096) == 2 * 128 * 2048 * 1088
    assert dsa.indexer_flops(4096) == 2 * 64 * 129 * 4096
    # q_a + q_b + kv_a + kv_b + o  (+ indexer wq_b, wk, weights_proj)
    base = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert mla.proj_params(7168) == base
    assert dsa.proj_params(7168) == base + 1536 * 64 * 128 + 7168 * 128 + 7168 * 64


def test_v4_layers_by_hand() -> None:
    ix = IndexerSpec(64, 128, 512)
    csa = V4Layer("csa", 64, compress_rate=4, indexer=ix)
    hca = V4Layer("hca", 64, compress_rate=128)
    swa = V4Layer("swa", 64)
    assert [(s.name, s.count) for s in csa.streams(1000)] == [("window", 128), ("compressed", 250), ("index", 250)]
    assert [(s.name, s.count) for s in hca.streams(1000)] == [("window", 128), ("compressed", 7)]
    assert [(s.name, s.count) for s in swa.streams(100)] == [("window", 100)]
    assert csa.attended(1000) == {"kv": 128 + 250, "index": 250}
    assert csa.attended(4 * 10_000)["kv"] == 128 + 512
    assert hca.core_flops(1000) == 2 * 64 * 135 * 1024
    assert csa.indexer_flops(1000) == 2 * 64 * 129 * 250
    assert csa.state_floats() == 6 * 4 * 512 + 6 * 4 * 128
    assert hca.state_floats() == 2 * 128 * 512 and swa.state_floats() == 0
    # q_a, q_b, kv, o_a (grouped), o_b, + HCA compressor kv and gate
    base = 4096 * 1024 + 1024 * 64 * 512 + 4096 * 512 + 64 * 512 * 1024 + 8 * 1024 * 4096
    assert swa.proj_params(4096) == base
    assert hca.proj_params(4096) == base + 2 * 4096 * 512
    assert csa.proj_params(4096) == base + 4 * 4096 * 512 + 4 * 4096 * 128 + 1024 * 64 * 128 + 4096 * 64
    with pytest.raises(InvalidInput):
        V4Layer("csa", 64, compress_rate=4)  # CSA needs an indexer
    with pytest.raises(InvalidInput):
        V4Layer("xyz", 64)


@given(st.integers(0, 3000), st.integers(1, 300), st.integers(0, 80))
def test_closed_form_sums(n: int, m: int, k: int) -> None:
    assert sum_min(n, m) == sum(min(i, m) for i in range(1, n + 1))
    assert sum_floor(n, m) == sum(i // m for i in range(1, n + 1))
    assert sum_min_floor(n, m, k) == sum(min(i // m, k) for i in range(1, n + 1))


LAYERS = [
    GQALayer(4, 2, 16),
    GQALayer(4, 1, 16, window=7, sinks=2),
    MLALayer(**V3),
    MLALayer(**V3, indexer=IndexerSpec(4, 8, 5)),
    V4Layer("csa", 4, head_dim=32, window=6, compress_rate=4, indexer=IndexerSpec(4, 8, 3)),
    V4Layer("hca", 4, head_dim=32, window=6, compress_rate=8),
    V4Layer("swa", 4, head_dim=32, window=6),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.kind)
@given(n=st.integers(0, 200))
def test_prefill_sum_equals_sum_of_positions(layer, n: int) -> None:
    brute = sum(layer.core_flops(i, absorbed=False) + layer.indexer_flops(i) for i in range(1, n + 1))
    assert layer.core_flops_sum(n) == brute


def test_preset_sizes_match_published_parameter_counts() -> None:
    # total / active parameters (B) from the model cards: V3 671/37, V4-Flash 284/13, V4-Pro 1600/49, Llama 8.03/70.6
    for name, total, active in [("deepseek-v3", 671, 37), ("deepseek-v4-flash", 284, 13),
                                ("deepseek-v4-pro", 1600, 49)]:  # fmt: skip
        spec = preset(name)
        assert abs(spec.total_params() / 1e9 / total - 1) < 0.025, name
        assert abs(spec.active_params() / 1e9 / active - 1) < 0.04, name
    assert abs(preset("llama-3.1-8b").total_params() / 8.03e9 - 1) < 0.01
    assert abs(preset("llama-3.1-70b").total_params() / 70.6e9 - 1) < 0.01
    assert abs(preset("qwen2.5-7b").total_params() / 7.62e9 - 1) < 0.01


def test_v4_schedules() -> None:
    assert preset("deepseek-v4-flash").kinds_summary() == "2 swa + 21 csa + 20 hca"
    assert preset("deepseek-v4-pro").kinds_summary() == "31 hca + 30 csa"
    gemma = preset("gemma3-270m")
    assert gemma.kinds_summary() == "15 sliding(512) + 3 mqa"
    assert [i for i, layer in enumerate(gemma.layers) if layer.window is None] == [5, 11, 17]


def test_unknown_preset_suggests_close_names() -> None:
    with pytest.raises(InvalidInput, match="did you mean deepseek-v4-pro"):
        get_preset("deepseek-v4-prp")
    with pytest.raises(InvalidInput, match="did you mean llama-3.1-8b"):
        resolve_spec("llama-3.1-8")
    assert set(PRESETS) >= {"deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro", "llama-3.1-8b",
                            "llama-3.1-70b", "qwen2.5-7b", "gemma3-270m", "smollm2-135m"}  # fmt: skip


def _same(a, b) -> bool:
    return (a.layers, a.mlps, a.hidden_size, a.vocab_size, a.tie_embeddings) == (
        b.layers, b.mlps, b.hidden_size, b.vocab_size, b.tie_embeddings)  # fmt: skip


def test_from_hf_deepseek_configs() -> None:
    from transformers import DeepseekV3Config, DeepseekV32Config

    assert _same(from_config(DeepseekV3Config()), preset("deepseek-v3"))
    assert _same(from_config(DeepseekV32Config()), preset("deepseek-v3.2"))
    flash = {"model_type": "deepseek_v4", "num_hidden_layers": 43,
             "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0]}  # fmt: skip
    assert _same(from_config(flash), preset("deepseek-v4-flash"))
    pro = dict(model_type="deepseek_v4", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
               q_lora_rank=1536, o_groups=16, index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
               compress_ratios=[128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0])  # fmt: skip
    assert _same(from_config(pro), preset("deepseek-v4-pro"))


def test_from_hf_llama_qwen_gemma(tmp_path) -> None:
    import json

    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 131072, "tie_word_embeddings": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(llama))
    assert _same(from_config(tmp_path), preset("llama-3.1-8b"))
    assert _same(resolve_spec(str(tmp_path / "config.json")), preset("llama-3.1-8b"))
    qwen = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "max_position_embeddings": 131072, "tie_word_embeddings": False}  # fmt: skip
    assert _same(from_config(qwen), preset("qwen2.5-7b"))
    gemma = {"model_type": "gemma3", "text_config": {"hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
             "sliding_window": 32, "vocab_size": 100}}  # fmt: skip
    spec = from_config(gemma)
    assert [layer.kind for layer in spec.layers] == ["sliding(32)"] * 5 + ["mqa"]


def test_unsupported_and_bad_configs(tmp_path) -> None:
    with pytest.raises(InvalidInput, match="not supported by the planner"):
        from_config({"model_type": "mistral"})
    with pytest.raises(InvalidInput, match="does not exist"):
        from_config(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        from_config(tmp_path)
