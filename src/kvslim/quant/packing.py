"""Bit packing of small integer codes into ``uint8`` bytes (the real storage of every sub-byte codec).

Layout: the codes of one vector are written as one little-endian bit stream, code ``j`` occupying bits
``[j*b, (j+1)*b)`` (least significant bit first); the stream is cut into bytes, bit ``k`` of the stream going to bit
``k % 8`` of byte ``k // 8``; the last byte is zero-padded. ``n`` codes of ``b`` bits therefore take exactly
``ceil(n*b/8)`` bytes, independent of alignment. Packing works along the last axis; all leading axes are kept.
"""

from __future__ import annotations

import sys

import torch

from kvslim.errors import InvalidInput

__all__ = ["packed_len", "pack_bits", "split_blocks", "unpack_bits"]

_LITTLE_ENDIAN = sys.byteorder == "little"


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
    if n == 0:
        return c.new_zeros(*lead, 0)
    if bits == 8:
        return c.contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shift-and-or
        per = 8 // bits
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(*lead, pad)], dim=-1)
        c = c.reshape(*lead, (n + pad) // per, per)
        out = c[..., 0].clone()
        for k in range(1, per):
            out |= c[..., k] << (k * bits)
        return out
    # general widths (3, 5, 6, 7): 8 codes make exactly `bits` bytes. The 8*bits-bit word sum_k code_k 2^(k*bits)
    # is formed by one float64 matmul (exact: < 2^53 for bits <= 6), and its little-endian bytes are the output.
    pad = (-n) % 8
    if pad:
        c = torch.cat([c, c.new_zeros(*lead, pad)], dim=-1)
    g = c.reshape(c.numel() // 8, 8)
    if bits <= 6:
        # float32 is exact for 3-bit words (< 2^24); 5-6-bit words need float64 (< 2^48)
        ftype = torch.float32 if bits == 3 else torch.float64
        weights = torch.tensor([float(1 << (k * bits)) for k in range(8)], dtype=ftype, device=c.device)
        word = (g.to(torch.float32).to(ftype) @ weights).to(torch.int64)
    else:
        g = g.to(torch.int64)
        word = g[:, 0].clone()
        for k in range(1, 8):
            word |= g[:, k] << (k * bits)
    out = _le_bytes(word)[:, :bits]
    return out.reshape(*lead, (n + pad) // 8 * bits)[..., : packed_len(n, bits)]


def _le_bytes(word: torch.Tensor) -> torch.Tensor:
    """int64 ``[M]`` -> its 8 little-endian bytes ``uint8 [M, 8]``."""
    if _LITTLE_ENDIAN:
        w = torch.empty(word.shape, dtype=torch.int64, device=word.device)  # unit stride even for one element
        w.copy_(word)
        return w.view(torch.uint8).reshape(w.numel(), 8)
    shifts = torch.arange(0, 64, 8, dtype=torch.int64, device=word.device)
    return ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


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
    if n == 0:
        return packed.new_zeros(*lead, 0)
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*lead, packed.shape[-1] * (8 // bits))[..., :n]
    groups = -(-n // 8)
    b = torch.nn.functional.pad(packed, (0, groups * bits - packed.shape[-1]))
    b = b.reshape(b.numel() // bits, bits)
    wide, width = (torch.int32, 4) if bits == 3 else (torch.int64, 8)  # int32 shifts are ~2x faster on CPU
    if _LITTLE_ENDIAN:
        word = torch.nn.functional.pad(b, (0, width - bits)).contiguous().view(wide).reshape(b.shape[0])
    else:
        b = b.to(wide)
        word = b[:, 0].clone()
        for j in range(1, bits):
            word |= b[:, j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, dtype=wide, device=packed.device)
    codes = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8)
    return codes.reshape(*lead, groups * 8)[..., :n]


def split_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., d]`` -> ``[..., ceil(d/block), block]``, zero-padding the last block (for per-block scales)."""
    nblocks = -(-x.shape[-1] // block)
    pad = nblocks * block - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], nblocks, block)
