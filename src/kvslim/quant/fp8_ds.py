"""DeepSeek V4's packed K=V entry (FlashMLA "MODEL1", vLLM ``fp8_ds_mla`` for V4; format ``fp8_ds_v4``).

One vector of dim d with r RoPE dims is one uint8 row ``[e4m3 codes of the d - r NoPE dims | one ue8m0 scale byte per
64 NoPE values | zero pad to an 8-byte boundary | bf16 RoPE dims]``: 448 + 7 + 1 + 128 = 584 B at d = 512, r = 64,
against 1,024 B in bf16. Scales are powers of two (the byte is the exponent + 127) chosen so the block's largest
magnitude fits e4m3's 448, as the V4 reference code's quant-dequant simulation does.
Fields: ``rows uint8 [..., T, bytes_per_vector]``.
"""

from __future__ import annotations

import math

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed

__all__ = ["FP8DsV4Codec", "ue8m0_exponents"]


def ue8m0_exponents(x: torch.Tensor, block: int, top: float) -> torch.Tensor:
    """Power-of-two scales per block of the last dim: exponents e with ``amax / 2^e <= top`` -> int [..., n_blocks]."""
    amax = x.abs().unflatten(-1, (-1, block)).amax(-1).clamp(min=2.0**-126)
    return torch.ceil(torch.log2(amax / top)).clamp(-127, 127).to(torch.int32)


class FP8DsV4Codec(Codec):
    """FP8 e4m3 NoPE dims with ue8m0 block-64 scales + bf16 RoPE dims, one uint8 row per vector."""

    name = "fp8_ds_v4"
    bits_per_value = 8.0
    block = 64

    def __init__(self, dim: int, rope_dim: int = 64) -> None:
        if not isinstance(dim, int) or not isinstance(rope_dim, int) or not 0 <= rope_dim < dim:
            raise InvalidInput(f"fp8_ds_v4 needs integer dims with 0 <= rope_dim < dim, got dim={dim}, rope_dim={rope_dim}")
        self.dim, self.rope_dim = dim, rope_dim
        self.nope = dim - rope_dim
        self.n_scales = math.ceil(self.nope / self.block)
        head = self.nope + self.n_scales
        self.pad = (-head) % 8
        self._bytes = head + self.pad + 2 * rope_dim

    def bytes_per_vector(self) -> int:
        return self._bytes

    def encode(self, x: torch.Tensor) -> Packed:
        """``x [..., T, d]`` float -> rows ``uint8 [..., T, bytes_per_vector]``."""
        nope = x[..., : self.nope].float()
        extra = (-self.nope) % self.block
        if extra:
            nope = torch.nn.functional.pad(nope, (0, extra))
        e = ue8m0_exponents(nope, self.block, 448.0)
        scaled = nope.unflatten(-1, (-1, self.block)) / torch.exp2(e.float()).unsqueeze(-1)
        codes = scaled.flatten(-2)[..., : self.nope].to(torch.float8_e4m3fn).view(torch.uint8)
        pad = torch.zeros((*x.shape[:-1], self.pad), dtype=torch.uint8, device=x.device)
        rope = x[..., self.nope :].to(torch.bfloat16).contiguous().view(torch.uint8)
        rows = torch.cat((codes, (e + 127).to(torch.uint8), pad, rope), -1)
        return Packed(self.name, tuple(x.shape), x.dtype, {"rows": rows})

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        row = packed.fields["rows"]
        codes = row[..., : self.nope].contiguous().view(torch.float8_e4m3fn).float()
        e = row[..., self.nope : self.nope + self.n_scales].to(torch.int32) - 127
        scale = torch.exp2(e.float()).repeat_interleave(self.block, -1)[..., : self.nope]
        rope = row[..., self._bytes - 2 * self.rope_dim :].contiguous().view(torch.bfloat16).float()
        return torch.cat((codes * scale, rope), -1).to(packed.dtype)
