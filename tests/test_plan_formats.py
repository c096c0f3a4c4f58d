"""Byte contract of kvslim.formats: hand-computed sizes per format, KIVI streams, format parsing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvslim.errors import InvalidInput
from kvslim.formats import (
    FORMATS,
    KVFormat,
    bytes_per_vector,
    kivi_fp16_tokens,
    parse_kv_format,
    vectors_nbytes,
    weight_bytes_per_param,
)

# (format, dim, role) -> bytes, computed by hand from the contract table
HAND = {
    ("fp32", 128, "key"): 512,
    ("fp16", 128, "key"): 256,
    ("bf16", 576, "key"): 1152,
    ("fp8", 128, "key"): 132,  # 128 e4m3 + one fp32 scale
    ("fp8", 129, "key"): 129 + 8,  # two blocks of 128
    ("fp4", 128, "key"): 68,  # 64 packed + 4 ue8m0 scales
    ("fp4", 33, "key"): 17 + 2,
    ("tq1", 128, "key"): 16 + 2,
    ("tq2", 128, "key"): 32 + 2,
    ("tq3", 128, "key"): 48 + 2,
    ("tq4", 128, "key"): 64 + 2,
    ("tq3", 10, "key"): 4 + 2,  # ceil(30 / 8) = 4
    ("tq2.5", 128, "key"): 40,  # 12 + 24 + 4
    ("tq3.5", 128, "key"): 60,  # 32 + 24 + 4
    ("tqprod2", 128, "key"): 16 + 16 + 4,
    ("tqprod3", 128, "key"): 32 + 16 + 4,
    ("tqprod4", 128, "key"): 48 + 16 + 4,
    ("kivi2", 128, "key"): 32 + 16,  # codes + 4 B per channel per 32 tokens = d/8
    ("kivi2", 128, "value"): 32 + 16,  # codes + fp16 scale + zero per 32 channels = 4 * 4
    ("kivi4", 64, "key"): 32 + 8,
    ("kivi4", 64, "value"): 32 + 8,
    ("kivi4", 40, "value"): 20 + 8,  # two channel groups
    ("fp8_ds_mla", 576, "key"): 656,  # 512 e4m3 + 4 fp32 scales + 64 bf16 RoPE
    ("fp8_ds_v4", 512, "key"): 584,  # 448 e4m3 + 7 ue8m0 + 1 pad + 64 bf16 RoPE
}


@pytest.mark.parametrize(("key", "expected"), list(HAND.items()), ids=[f"{k[0]}-{k[1]}-{k[2]}" for k in HAND])
def test_hand_computed_sizes(key: tuple[str, int, str], expected: int) -> None:
    fmt, dim, role = key
    assert bytes_per_vector(fmt, dim, role) == expected


def test_every_format_has_a_hand_case() -> None:
    assert {k[0] for k in HAND} == set(FORMATS)


@given(st.sampled_from([f for f in FORMATS if not f.startswith("kivi")]), st.integers(1, 40).map(lambda x: 4 * x + 64),
       st.integers(0, 300))  # fmt: skip
def test_stream_is_n_vectors(fmt: str, dim: int, n: int) -> None:
    assert vectors_nbytes(fmt, dim, n) == n * bytes_per_vector(fmt, dim)


@given(st.sampled_from(["fp8", "fp4", "tq1", "tq2", "tq3", "tq4", "tqprod2", "tqprod3", "tqprod4"]),
       st.integers(1, 1024))  # fmt: skip
def test_quantised_formats_are_smaller_than_fp16_and_monotone(fmt: str, dim: int) -> None:
    b = bytes_per_vector(fmt, dim)
    assert bytes_per_vector(fmt, dim + 1) >= b
    if dim >= 64:
        assert b < 2 * dim


def test_kivi_streams_by_hand() -> None:
    # d = 128, 2-bit, n = 300: keys quantise 256 tokens (2 x R) -> 256 * 32 B + 8 groups * 4 B * 128 + 44 fp16 tokens
    assert kivi_fp16_tokens(300, "key") == 44
    assert vectors_nbytes("kivi2", 128, 300, "key") == 256 * 32 + 8 * 512 + 44 * 256
    # values: FIFO of the 128 newest in fp16, 172 quantised at 32 + 16 B
    assert kivi_fp16_tokens(300, "value") == 128
    assert vectors_nbytes("kivi2", 128, 300, "value") == 172 * 48 + 128 * 256
    # short streams are all fp16
    assert vectors_nbytes("kivi4", 64, 100, "key") == vectors_nbytes("kivi4", 64, 100, "value") == 100 * 128


@given(st.integers(0, 5000), st.sampled_from(["key", "value"]))
def test_kivi_amortised_rate_matches_stream_when_fully_quantised(n: int, role: str) -> None:
    fp = kivi_fp16_tokens(n, role)
    q = n - fp
    assert vectors_nbytes("kivi2", 128, n, role) == q * bytes_per_vector("kivi2", 128, role) + fp * 256


def test_bad_formats_and_dims() -> None:
    with pytest.raises(InvalidInput, match="did you mean fp8"):
        bytes_per_vector("fp9", 128)
    with pytest.raises(InvalidInput):
        bytes_per_vector("fp8", 0)
    with pytest.raises(InvalidInput):
        bytes_per_vector("tq2.5", 126)
    with pytest.raises(InvalidInput):
        bytes_per_vector("fp8_ds_v4", 64)
    with pytest.raises(InvalidInput):
        vectors_nbytes("fp16", 8, -1)
    with pytest.raises(InvalidInput):
        weight_bytes_per_param("tq3")


def test_parse_kv_format() -> None:
    assert parse_kv_format("fp8") == KVFormat("fp8", "fp8")
    assert parse_kv_format("production").production
    assert parse_kv_format("kv=fp8_ds_v4,index=fp4") == KVFormat("fp8_ds_v4", "fp4")
    assert parse_kv_format("kv=tq3") == KVFormat("tq3", "tq3")
    assert str(parse_kv_format("kv=fp8,index=fp4")) == "kv=fp8,index=fp4"
    for bad in ("fp7", "kv=fp8,idx=fp4", "kv=zz"):
        with pytest.raises(InvalidInput):
            parse_kv_format(bad)


def test_weight_bytes() -> None:
    assert weight_bytes_per_param("bf16") == 2
    assert math.isclose(weight_bytes_per_param("fp8"), 132 / 128)
    assert math.isclose(weight_bytes_per_param("fp4"), 68 / 128)
