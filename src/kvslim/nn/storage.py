"""Packed storage of V4 cache rows as DeepSeek ships it: the ``kvslim.quant`` codecs, one uint8 row per vector.

- :class:`Fp8DsV4`: one K=V row (window token or compressed entry) in format ``fp8_ds_v4``
  (:class:`kvslim.quant.fp8_ds.FP8DsV4Codec`): 584 B at d = 512, r = 64, against 1,024 B in bf16.
- :class:`Fp4`: an indexer key in format ``fp4`` (:class:`kvslim.quant.fp4.FP4Codec`): e2m1 codes two per byte plus
  one ue8m0 scale byte per 32 values, ``ceil(d/2) + ceil(d/32)`` B (68 B at d = 128).

Both store each vector as one uint8 row (the codec's packed fields side by side), so the V4 state's ring buffer and
entry stores hold plain ``[..., n, bytes]`` tensors; the bytes equal the format's contract in :mod:`kvslim.formats`.
"""

from __future__ import annotations

import torch

from kvslim.quant import make_codec
from kvslim.quant.base import Packed

__all__ = ["Fp8DsV4", "Fp4", "RowCodec"]


class RowCodec:
    """A ``kvslim.quant`` codec whose fields are all uint8, stored as one uint8 row per vector.

    ``encode(x [..., d]) -> uint8 [..., bytes_per_vector]``; ``decode(rows) -> float32 [..., d]``.
    """

    def __init__(self, name: str, dim: int, **options) -> None:
        self.codec = make_codec(name, dim, **options)
        probe = self.codec.encode(torch.zeros(1, dim))
        self._widths = {k: v.shape[-1] for k, v in probe.fields.items()}
        self.dim = dim
        self.bytes_per_vector = sum(self._widths.values())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.codec.encode(x.float())
        return torch.cat([packed.fields[k] for k in self._widths], -1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        fields = dict(zip(self._widths, rows.split(list(self._widths.values()), -1), strict=True))
        packed = Packed(self.codec.name, (*rows.shape[:-1], self.dim), torch.float32, fields)
        return self.codec.decode(packed)


class Fp8DsV4(RowCodec):
    """V4 K=V rows: FP8 e4m3 NoPE dims with ue8m0 block-64 scales + bf16 RoPE dims."""

    def __init__(self, dim: int, rope_dim: int) -> None:
        super().__init__("fp8_ds_v4", dim, rope_dim=rope_dim)


class Fp4(RowCodec):
    """Indexer keys: FP4 e2m1 codes (two per byte, low nibble first) + ue8m0 block-32 scales."""

    def __init__(self, dim: int) -> None:
        super().__init__("fp4", dim)
