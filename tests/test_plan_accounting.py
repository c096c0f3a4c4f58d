"""kvslim.plan: hand-computed totals per kind and format, read bytes, FLOPs, fit, parsing, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvslim.errors import ContextTooLong, InvalidInput
from kvslim.formats import KVFormat
from kvslim.plan import (
    GiB,
    bytes_per_token,
    check_context,
    decode_flops,
    decode_read_bytes,
    expected_cache_bytes,
    fit,
    kv_breakdown,
    kv_bytes,
    layer_format,
    parse_bytes,
    parse_contexts,
    prefill_flops,
)
from kvslim.plan.presets import preset
from kvslim.plan.spec import ArchSpec, GQALayer, IndexerSpec, MLALayer, MLPSpec, V4Layer

V3 = dict(n_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536)


def one_layer(layer, hidden: int = 64, max_context: int = 1 << 20) -> ArchSpec:
    return ArchSpec("t", hidden, 100, (layer,), (MLPSpec(128),), max_context)


def test_gqa_bytes_by_hand() -> None:
    spec = one_layer(GQALayer(4, 2, 16))
    assert kv_bytes(spec, 10) == 2 * 2 * 10 * 16 * 2  # K and V, 2 heads, 10 tokens, bf16
    assert kv_bytes(spec, 10, "fp32") == 2 * 2 * 10 * 16 * 4
    assert kv_bytes(spec, 10, "fp8") == 2 * 2 * 10 * (16 + 4)
    sliding = one_layer(GQALayer(4, 1, 16, window=8))
    assert kv_bytes(sliding, 5) == 2 * 5 * 32 and kv_bytes(sliding, 1000) == 2 * 8 * 32
    assert kv_bytes(spec, 10, batch=3) == 3 * kv_bytes(spec, 10)
    # KIVI-2, d = 128, 1 head, 300 tokens: keys 256 quantised + 44 fp16, values 172 quantised + 128 fp16
    kivi = one_layer(GQALayer(1, 1, 128))
    assert kv_bytes(kivi, 300, "kivi2") == (256 * 32 + 8 * 512 + 44 * 256) + (172 * 48 + 128 * 256)


def test_bytes_per_token() -> None:
    gemma = preset("gemma3-270m")  # full layers: 2 x 256 x 2 B per token; sliding layers: 512 tokens total
    per = bytes_per_token(gemma, 4096, per_layer=True)
    assert per[5] == 1024 and per[0] == 512 * 1024 / 4096
    assert bytes_per_token(gemma, 4096) == sum(per)
    assert bytes_per_token(preset("deepseek-v3"), 10) == 61 * 1152


def test_mla_dsa_bytes_by_hand() -> None:
    dsa = one_layer(MLALayer(**V3, indexer=IndexerSpec(64, 128, 2048)), hidden=7168)
    assert kv_breakdown(dsa, 1000) == {"kv": 1152 * 1000, "index": 256 * 1000, "state": 0}
    assert kv_bytes(dsa, 1000, "production") == (656 + 132) * 1000
    assert kv_bytes(dsa, 1000, "kv=fp8_ds_mla,index=fp4") == (656 + 68) * 1000
    # one decode step reads the top-2048 latents and every indexer key
    assert decode_read_bytes(dsa, 10_000, "production") == 2048 * 656 + 10_000 * 132


def test_v4_bytes_by_hand() -> None:
    csa = one_layer(V4Layer("csa", 64, compress_rate=4, indexer=IndexerSpec(64, 128, 512)), hidden=4096)
    state = 4 * (6 * 4 * 512 + 6 * 4 * 128)
    assert kv_breakdown(csa, 1000) == {"kv": 378 * 1024, "index": 250 * 256, "state": state}
    assert kv_bytes(csa, 1000, "production", include_state=False) == 378 * 584 + 250 * 68
    assert decode_read_bytes(csa, 40_000, "production") == (128 + 512) * 584 + 10_000 * 68
    hca = one_layer(V4Layer("hca", 64, compress_rate=128), hidden=4096)
    assert kv_bytes(hca, 1000, include_state=False) == 135 * 1024
    assert decode_read_bytes(hca, 1000) == 135 * 1024


def test_published_bf16_arithmetic() -> None:
    # vLLM's worked numbers (deepseek-attention.md 4b): V3.2 1.375 GiB per layer, V4-Pro CSA 320.125 MiB, HCA 8.125 MiB
    n = 1 << 20
    assert kv_bytes(preset("deepseek-v3.2"), n) == 61 * 1408 * n
    pro = preset("deepseek-v4-pro")
    assert kv_bytes(pro, n, include_state=False) == 30 * 335_675_392 + 31 * 8_519_680


def test_format_rules() -> None:
    gqa, mla = GQALayer(4, 2, 16), MLALayer(**V3)
    v4 = V4Layer("hca", 64, compress_rate=128)
    assert layer_format(gqa, "kv", "production") == "bf16"
    assert layer_format(mla, "kv", "production") == "fp8_ds_mla"
    assert layer_format(v4, "index", KVFormat(production=True)) == "fp4"
    with pytest.raises(InvalidInput):
        layer_format(gqa, "kv", "fp8_ds_mla")
    with pytest.raises(InvalidInput):
        layer_format(mla, "kv", "fp8_ds_v4")
    with pytest.raises(InvalidInput):
        layer_format(v4, "kv", "kivi2")
    with pytest.raises(InvalidInput):
        layer_format(mla, "index", "kv=bf16,index=fp8_ds_mla")


def test_decode_flops_by_hand() -> None:
    spec = one_layer(GQALayer(4, 2, 16))
    f = decode_flops(spec, 10)
    active = 100 * 64 + (64 * 128 + 64 * 64) + 3 * 64 * 128  # head + attention + MLP
    assert f == {"projections": 2 * active, "attention": 2 * 4 * 10 * 32, "indexer": 0,
                 "total": 2 * active + 2 * 4 * 10 * 32}  # fmt: skip
    p = prefill_flops(spec, 10)
    assert p["total"] == 10 * 2 * active + 2 * 4 * 32 * 55


@given(st.integers(1, 5000))
def test_totals_grow_with_context(n: int) -> None:
    for name in ("deepseek-v4-flash", "gemma3-270m"):
        spec = preset(name)
        assert kv_bytes(spec, n + 1) >= kv_bytes(spec, n)
        assert decode_flops(spec, n + 1)["total"] >= decode_flops(spec, n)["total"]
        assert decode_read_bytes(spec, n) <= kv_bytes(spec, n)


def test_fit() -> None:
    spec = preset("llama-3.1-8b")
    r = fit(spec, 1 << 17, parse_bytes("80GB"), "bf16", "bf16")
    assert r["weights_bytes"] == 2 * spec.total_params()
    assert r["kv_bytes_per_sequence"] == 16 * GiB
    assert r["sequences"] == (80 * 10**9 - r["weights_bytes"]) // (16 * GiB) == 3
    assert fit(preset("deepseek-v4-pro"), 1 << 20, parse_bytes("141GiB"), "production", "fp8")["sequences"] == 0


def test_parse_contexts_and_bytes() -> None:
    assert parse_contexts("1M,128k,8k") == [1048576, 131072, 8192]
    assert parse_contexts("100, 2K,0.5k") == [100, 2048, 512]
    for bad in ("0", "-5", "12x", "", "1.5"):
        with pytest.raises(InvalidInput):
            parse_contexts(bad)
    assert parse_bytes("141GiB") == 141 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1024") == 1024
    for bad in ("0GiB", "12 parsecs", "GiB"):
        with pytest.raises(InvalidInput):
            parse_bytes(bad)


def test_check_context() -> None:
    spec = preset("smollm2-135m")
    assert check_context(spec, 8192) == 8192
    with pytest.raises(ContextTooLong, match="maximum of 8,192"):
        check_context(spec, 8193)
    assert check_context(spec, 8193, allow_beyond_max=True) == 8193
    with pytest.raises(InvalidInput):
        check_context(spec, 0)


def test_expected_cache_bytes_hf_layout() -> None:
    gemma = preset("gemma3-270m")
    # 15 sliding layers keep 511 tokens + an 8-byte counter, 3 full layers keep n; 1 KV head of 256, K and V, fp32
    n = 2000
    assert expected_cache_bytes(gemma, n) == 15 * (511 * 2 * 256 * 4 + 8) + 3 * n * 2 * 256 * 4
    with pytest.raises(InvalidInput):
        expected_cache_bytes(preset("deepseek-v3"), 10)
    assert expected_cache_bytes(gemma, n, "bf16", layout="plan") == kv_bytes(gemma, n)
