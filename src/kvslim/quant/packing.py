"""Bit packing of small integer codes into ``uint8`` bytes (the real storage of every sub-byte codec).

Layout: the codes of one vector are written as one little-endian bit stream, code ``j`` occupying bits
``[j*b, (j+1)*b)`` (least significant bit first); the stream is cut into bytes, bit ``k`` of the stream going to bit
``k % 8`` of byte ``k // 8``; the last byte is zero-padded. ``n`` codes of ``b`` bits therefore take exactly
``ceil(n*b/8)`` bytes, independent of alignment. Packing works along the last axis; all leading axes are kept.
"""

from __future__ import annotations

import torch

from kvslim.errors import InvalidInput

__all__ = ["packed_len", "pack_bits", "unpack_bits"]


def packed_len(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n*bits/8)``."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise InvalidInput(f"bit width must be an integer in 1..8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` (each in ``[0, 2**bits)``) into ``uint8 [..., ceil(n*bits/8)]``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise InvalidInput(f"codes must be an integer tensor, got {codes.dtype}")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shift-and-or
        per = 8 // bits
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(*lead, pad)], dim=-1)
        c = c.reshape(*lead, -1, per)
        out = c[..., 0].clone()
        for k in range(1, per):
            out |= c[..., k] << (k * bits)
        return out
    # general widths (3, 5, 6, 7): expand to a bit stream, then fold 8 bits per byte
    shifts = torch.arange(bits, dtype=torch.uint8, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    pad = (-(n * bits)) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    stream = stream.reshape(*lead, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=c.device)).to(torch.uint8)
    return (stream * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., ceil(n*bits/8)]`` -> ``uint8 [..., n]`` codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise InvalidInput(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_len(n, bits):
        raise InvalidInput(
            f"packed last axis has {packed.shape[-1]} bytes, but {n} codes of {bits} bits need {packed_len(n, bits)}"
        )
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*lead, -1)[..., :n]
    shifts8 = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts8) & 1).reshape(*lead, -1)[..., : n * bits]
    stream = stream.reshape(*lead, n, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (stream * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
