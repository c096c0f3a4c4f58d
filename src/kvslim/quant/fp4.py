"""FP4 e2m1 storage with one ue8m0 (power-of-two, 1-byte) scale per block of 32 values (OCP MXFP4-like).

Per vector ``x [d]``, per block of 32 channels (the last may be shorter): exponent ``e = ceil(log2(amax / 6))``
so that ``amax / 2**e <= 6`` (no saturation; the OCP spec's ``floor(log2 amax) - 2`` would clip up to 8/6 of the
range), stored as the byte ``e + 127``; each value ``x / 2**e`` is rounded to the nearest e2m1 number
(+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) and stored as a 4-bit code (bit 3 = sign, bits 0-2 = magnitude index), two codes
per byte (low nibble first). Stored bytes per vector: ``ceil(d/2) + ceil(d/32)`` (68 B at d = 128).
Fields: ``codes uint8 [..., T, ceil(d/2)]``, ``scale uint8 [..., T, ceil(d/32)]``.
"""

from __future__ import annotations

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed
from kvslim.quant.codebooks import bucket
from kvslim.quant.packing import pack_bits, split_blocks, unpack_bits

__all__ = ["FP4Codec", "E2M1_VALUES"]

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class FP4Codec(Codec):
    name = "fp4"
    bits_per_value = 4.0

    def __init__(self, dim: int, block: int = 32) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"fp4 needs a positive integer dimension, got {dim!r}")
        self.dim = dim
        self.block = block
        self.nblocks = -(-dim // block)
        self.values = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        self.midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.values, self.midpoints]

    def bytes_per_vector(self) -> int:
        return -(-self.dim // 2) + self.nblocks

    def _blocks(self, xf: torch.Tensor) -> torch.Tensor:
        return split_blocks(xf, self.block)

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        xb = self._blocks(x.to(torch.float32))
        amax = xb.abs().amax(dim=-1)
        e = torch.ceil(torch.log2(torch.where(amax > 0, amax / 6.0, torch.ones_like(amax)))).clamp(-127, 127)
        v = xb / torch.exp2(e).unsqueeze(-1)
        mag = bucket(v.abs(), list(_MIDPOINTS))
        code = (mag | ((v < 0).to(torch.uint8) << 3)).reshape(*x.shape[:-1], self.nblocks * self.block)[..., : self.dim]
        fields = {"codes": pack_bits(code, 4), "scale": (e + 127).to(torch.uint8)}
        return Packed(self.name, tuple(x.shape), x.dtype, fields)

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        code = unpack_bits(packed.fields["codes"], 4, self.dim).long()
        vals = self.values[code & 7] * (1 - 2 * (code >> 3)).to(torch.float32)
        e = packed.fields["scale"].to(torch.float32) - 127
        vb = self._blocks(vals) * torch.exp2(e).unsqueeze(-1)
        return vb.reshape(*vals.shape[:-1], self.nblocks * self.block)[..., : self.dim].to(packed.dtype)
