"""Bit packing: exact round trips (hypothesis, odd sizes), byte counts, and the documented bit layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslim.errors import InvalidInput
from kvslim.quant.packing import pack_bits, packed_len, unpack_bits


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 8),
    n=st.integers(0, 67),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_bit_exact(bits: int, n: int, lead: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_len(n, bits))
    assert packed.shape[-1] == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_is_lsb_first_stream(bits: int) -> None:
    # reference: build the little-endian bit stream by hand
    codes = torch.tensor([(7 * i + 3) % (1 << bits) for i in range(11)], dtype=torch.uint8)
    stream = [(int(c) >> k) & 1 for c in codes for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = [sum(stream[8 * j + k] << k for k in range(8)) for j in range(len(stream) // 8)]
    assert pack_bits(codes, bits).tolist() == expected


def test_padding_bits_are_zero_and_codes_are_masked_on_unpack() -> None:
    codes = torch.tensor([5, 6, 7], dtype=torch.uint8)  # 9 bits at b=3 -> 2 bytes, 7 pad bits
    packed = pack_bits(codes, 3)
    assert packed[-1].item() >> 1 == 0
    assert unpack_bits(packed, 3, 3).tolist() == [5, 6, 7]


def test_bad_widths_and_shapes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="1..8"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(InvalidInput, match="integer tensor"):
        pack_bits(torch.zeros(4), 2)
    with pytest.raises(InvalidInput, match="need"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 16)
