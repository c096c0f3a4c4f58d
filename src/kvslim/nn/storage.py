"""Packed storage of V4 cache rows as DeepSeek ships it, emulated on CPU with real uint8 bytes.

- :class:`Fp8DsV4`: one K=V row (window token or compressed entry) of dim d with r RoPE dims, laid out as
  ``[e4m3 codes of the d - r NoPE dims | one ue8m0 scale byte per 64 NoPE values | zero pad to an 8-byte
  boundary | bf16 RoPE dims]``. At d = 512, r = 64: 448 + 7 + 1 + 128 = 584 B (FlashMLA "MODEL1" / vLLM
  ``fp8_ds_mla`` for V4; the brief's ``fp8_ds_v4``), against 1,024 B in bf16.
- :class:`Fp4`: an indexer key of dim d as e2m1 codes packed two per byte plus one ue8m0 scale byte per 32 values:
  ``ceil(d/2) + ceil(d/32)`` B (68 B at d = 128; the brief's ``fp4``).

Scales are powers of two (ue8m0: the byte is the exponent + 127) chosen so the block's largest magnitude fits
(448 for e4m3, 6 for e2m1), as the V4 reference code's quant-dequant simulation does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Fp8DsV4", "Fp4", "ue8m0_scales"]

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MID = (_E2M1[1:] + _E2M1[:-1]) / 2


def ue8m0_scales(x: torch.Tensor, block: int, top: float) -> torch.Tensor:
    """Power-of-two scales per block of the last dim: exponents e with ``amax / 2^e <= top`` -> int [..., n_blocks]."""
    amax = x.abs().unflatten(-1, (-1, block)).amax(-1).clamp(min=2.0**-126)
    return torch.ceil(torch.log2(amax / top)).clamp(-127, 127).to(torch.int32)


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    extra = (-x.shape[-1]) % block
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


class Fp8DsV4:
    """FP8 e4m3 NoPE dims with ue8m0 block-64 scales + bf16 RoPE dims, one uint8 row per vector."""

    block = 64

    def __init__(self, dim: int, rope_dim: int):
        self.dim, self.rope_dim = dim, rope_dim
        self.nope = dim - rope_dim
        self.n_scales = math.ceil(self.nope / self.block)
        head = self.nope + self.n_scales
        self.pad = (-head) % 8
        self.bytes_per_vector = head + self.pad + 2 * rope_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] float -> uint8 [..., bytes_per_vector]."""
        nope = _pad_to_blocks(x[..., : self.nope].float(), self.block)
        e = ue8m0_scales(nope, self.block, 448.0)
        scaled = nope.unflatten(-1, (-1, self.block)) / torch.exp2(e.float()).unsqueeze(-1)
        codes = scaled.flatten(-2)[..., : self.nope].to(torch.float8_e4m3fn).view(torch.uint8)
        scales = (e + 127).to(torch.uint8)
        pad = torch.zeros((*x.shape[:-1], self.pad), dtype=torch.uint8)
        rope = x[..., self.nope :].to(torch.bfloat16).contiguous().view(torch.uint8)
        return torch.cat((codes, scales, pad, rope), -1)

    def decode(self, row: torch.Tensor) -> torch.Tensor:
        """uint8 [..., bytes_per_vector] -> float32 [..., d]."""
        codes = row[..., : self.nope].contiguous().view(torch.float8_e4m3fn).float()
        e = row[..., self.nope : self.nope + self.n_scales].to(torch.int32) - 127
        scale = torch.exp2(e.float()).repeat_interleave(self.block, -1)[..., : self.nope]
        rope = row[..., self.bytes_per_vector - 2 * self.rope_dim :].contiguous().view(torch.bfloat16).float()
        return torch.cat((codes * scale, rope), -1)


class Fp4:
    """FP4 e2m1 codes (two per byte, low nibble first) + ue8m0 block-32 scales, one uint8 row per vector."""

    block = 32

    def __init__(self, dim: int):
        self.dim = dim
        self.n_scales = math.ceil(dim / self.block)
        self.code_bytes = math.ceil(dim / 2)
        self.bytes_per_vector = self.code_bytes + self.n_scales

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        v = _pad_to_blocks(x.float(), self.block)
        e = ue8m0_scales(v, self.block, 6.0)
        scaled = (v.unflatten(-1, (-1, self.block)) / torch.exp2(e.float()).unsqueeze(-1)).flatten(-2)
        scaled = scaled[..., : self.dim]
        mag = torch.bucketize(scaled.abs(), _E2M1_MID)  # nearest of the 8 magnitudes (ties to the lower)
        code = (mag | ((scaled < 0).to(torch.long) << 3)).to(torch.uint8)
        if self.dim % 2:
            code = torch.nn.functional.pad(code, (0, 1))
        packed = code[..., 0::2] | (code[..., 1::2] << 4)
        return torch.cat((packed, (e + 127).to(torch.uint8)), -1)

    def decode(self, row: torch.Tensor) -> torch.Tensor:
        packed = row[..., : self.code_bytes]
        code = torch.stack((packed & 15, packed >> 4), -1).flatten(-2)[..., : self.dim].long()
        val = _E2M1[code & 7] * torch.where(code >= 8, -1.0, 1.0)
        e = row[..., self.code_bytes :].to(torch.int32) - 127
        scale = torch.exp2(e.float()).repeat_interleave(self.block, -1)[..., : self.dim]
        return val * scale
