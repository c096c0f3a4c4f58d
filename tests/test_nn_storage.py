"""Packed V4 storage (FP8 e4m3 + ue8m0 block scales + bf16 RoPE; FP4 e2m1 indexer keys) and its byte counts."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslim.nn import from_transformers
from kvslim.nn.hf_reference import hf_attention, tiny_v4_config
from kvslim.nn.storage import Fp4, Fp8DsV4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_byte_layouts_match_the_contract() -> None:
    assert Fp8DsV4(512, 64).bytes_per_vector == 584  # 448 e4m3 + 7 ue8m0 + 1 pad + 64 bf16
    assert Fp4(128).bytes_per_vector == 68  # 64 packed codes + 4 ue8m0
    row = Fp8DsV4(512, 64).encode(torch.randn(3, 512))
    assert row.dtype == torch.uint8 and row.shape == (3, 584)
    assert row[:, 455].eq(0).all()  # the pad byte


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.sampled_from([64, 96, 512]), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_fp8_round_trip_error_is_bounded(n: int, dim: int, seed: int, scale: float) -> None:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale
    codec = Fp8DsV4(dim, 16)
    y = codec.decode(codec.encode(x))
    assert torch.equal(y[:, -16:], x[:, -16:].to(torch.bfloat16).float())  # RoPE dims: bf16 exactly
    nope = x[:, :-16].unflatten(-1, (-1, 16))
    err = (y[:, :-16] - x[:, :-16]).unflatten(-1, (-1, 16)).abs()
    # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 of values in the normal range; the block scale is at most
    # 2x larger than needed, so subnormals stay within 2^-9 of the block max
    bound = nope.abs() * 2.0**-4 + nope.abs().amax(-1, keepdim=True) * 2.0**-9
    assert (err <= bound + 1e-30).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.sampled_from([32, 33, 128]), st.integers(0, 2**31 - 1), st.integers(-20, 20))
def test_fp4_is_lossless_on_representable_values(n: int, dim: int, seed: int, exp: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = torch.randint(0, 8, (n, dim), generator=gen)
    codes[:, 0] = 7  # each block's max is 6 * 2^exp, so the chosen scale is exactly 2^exp
    codes[:, 32::32] = 7
    sign = torch.where(torch.rand(n, dim, generator=gen) < 0.5, -1.0, 1.0)
    x = grid[codes] * sign * 2.0**exp
    codec = Fp4(dim)
    packed = codec.encode(x)
    assert packed.shape[-1] == (dim + 1) // 2 + (dim + 31) // 32
    assert torch.equal(codec.decode(packed), x)


def test_v4_packed_state_decodes_like_its_prefill_and_counts_bytes() -> None:
    hf = hf_attention(tiny_v4_config("compressed_sparse_attention"), seed=5)
    ours = from_transformers(hf)
    c = ours.config
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(3))
    exact = ours(x)
    st_full = ours.new_state("v4")
    packed = ours(x, st_full)
    # lossy: FP8 K=V rows alone move the output by ~2-5 %; FP4 indexer keys also flip some top-k picks
    assert 1e-3 < rel(packed, exact) < 0.3
    st_steps = ours.new_state("v4")
    steps = torch.cat([ours(x[:, t : t + 1], st_steps) for t in range(40)], 1)
    assert rel(steps, packed) <= 1e-4
    fp8 = Fp8DsV4(c.head_dim, c.rope_dim).bytes_per_vector
    fp4 = Fp4(c.index_head_dim).bytes_per_vector
    buffers = 2 * 2 * c.compress_rate * (2 * c.head_dim + 2 * c.index_head_dim) * 4
    carry = 2 * 2 * c.compress_rate * (c.head_dim + c.index_head_dim) * 4
    expect = 2 * (c.window * fp8 + 10 * fp8 + 10 * fp4) + buffers + carry
    assert st_full.nbytes() == st_steps.nbytes() == expect
    assert st_full.win_kv.dtype == torch.uint8 and st_full.indexer.entries.data.dtype == torch.uint8


def test_v4_fp8_rows_alone_stay_close() -> None:
    """HCA has no indexer: the only loss is FP8 e4m3 on the NoPE dims of window and entries."""
    ours = from_transformers(hf_attention(tiny_v4_config("heavily_compressed_attention"), seed=6))
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(4))
    assert 1e-3 < rel(ours(x, ours.new_state("v4")), ours(x)) < 0.06


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1), st.integers(0, 8))
def test_topk_first_picks_earliest_among_ties_at_any_width(n: int, k: int, seed: int, extra: int) -> None:
    from kvslim.nn._common import topk_first

    k = min(k, n)
    scores = torch.randint(0, 4, (3, n), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    expect = torch.sort(order, dim=-1).values
    assert torch.equal(topk_first(scores, k).sort(-1).values, expect)
    wider = torch.cat((scores, torch.full((3, extra), float("-inf"))), -1)
    assert torch.equal(topk_first(wider, k).sort(-1).values, expect)


def test_v4_state_bytes_equal_the_planner() -> None:
    """V4State.nbytes() == the planner's expected bytes (layout "plan"): fp32 rows, and packed fp8_ds_v4 rows + fp4
    indexer keys (the planner's fp8_ds_v4 needs 64 RoPE dims, so this config has head_dim 128 with 64 RoPE dims)."""
    from kvslim.plan import expected_cache_bytes
    from kvslim.plan.spec_hf import spec_from_config

    for kind in ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"):
        cfg = tiny_v4_config(kind, head_dim=128, partial_rotary_factor=0.5, index_head_dim=64, o_groups=2)
        ours = from_transformers(hf_attention(cfg, seed=2))
        spec = spec_from_config(cfg)
        x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
        for storage, fmt in (("float", "fp32"), ("v4", "kv=fp8_ds_v4,index=fp4")):
            state = ours.new_state(storage)
            ours(x, state)
            assert state.nbytes() == expected_cache_bytes(spec, 37, fmt, batch=2, layout="plan"), (kind, storage)


def test_reserved_bytes_bound_the_stored_bytes() -> None:
    ours = from_transformers(hf_attention(tiny_v4_config("compressed_sparse_attention"), seed=2))
    state = ours.new_state()
    ours(torch.randn(2, 600, 64), state)
    entries = state.compressor.entries.nbytes() + state.indexer.entries.nbytes()
    assert state.nbytes() <= state.reserved_nbytes() <= state.nbytes() + entries
