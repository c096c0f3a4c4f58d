"""FP8 e4m3 storage with one float32 scale per block of 128 values (DeepSeek V3 / FlashMLA style).

Per vector ``x [d]``, per block ``k`` of 128 channels (the last block may be shorter): ``s_k = amax_k / 448``
(1 for an all-zero block), codes ``= float8_e4m3fn(x / s_k)`` stored as their raw bytes (``uint8`` view).
Stored bytes per vector: ``d + 4 * ceil(d/128)`` (132 B at d = 128).
Fields: ``codes uint8 [..., T, d]``, ``scale float32 [..., T, ceil(d/128)]``.
"""

from __future__ import annotations

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed
from kvslim.quant.kernels import lookup_mix, lookup_score
from kvslim.quant.packing import split_blocks

__all__ = ["FP8Codec", "E4M3_MAX"]

E4M3_MAX = 448.0


class FP8Codec(Codec):
    """FP8 e4m3 per block of ``block`` channels. ``score_f32`` / ``mix_f32`` read the code bytes through the table of
    the 256 e4m3 values (a computing aid, not stored per vector)."""

    name = "fp8"
    bits_per_value = 8.0
    attends_from_codes = True

    def __init__(self, dim: int, block: int = 128) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"fp8 needs a positive integer dimension, got {dim!r}")
        if not hasattr(torch, "float8_e4m3fn"):
            raise InvalidInput("this torch build has no float8_e4m3fn dtype; fp8 storage needs torch >= 2.1")
        self.dim = dim
        self.block = block
        self.nblocks = -(-dim // block)
        self.table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)

    def bytes_per_vector(self) -> int:
        return self.dim + 4 * self.nblocks

    def _blocks(self, xf: torch.Tensor) -> torch.Tensor:
        return split_blocks(xf, self.block)

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        xb = self._blocks(x.to(torch.float32))
        amax = xb.abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        q = (xb / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        codes = q.reshape(*x.shape[:-1], self.nblocks * self.block)[..., : self.dim].contiguous().view(torch.uint8)
        return Packed(self.name, tuple(x.shape), x.dtype, {"codes": codes, "scale": scale})

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        vals = packed.fields["codes"].view(torch.float8_e4m3fn).to(torch.float32)
        vb = self._blocks(vals) * packed.fields["scale"].unsqueeze(-1)
        return vb.reshape(*vals.shape[:-1], self.nblocks * self.block)[..., : self.dim].to(packed.dtype)

    def score_f32(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        f = packed.fields
        return lookup_score(q, f["codes"], 8, self.table, self.dim, f["scale"], self.block)

    def mix_f32(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        f = packed.fields
        return lookup_mix(w, f["codes"], 8, self.table, self.dim, f["scale"], self.block)
