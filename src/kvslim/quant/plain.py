"""Plain float storage (``fp32`` / ``fp16`` / ``bf16``): the vector itself in the storage dtype, ``itemsize * d``
bytes per vector. ``lossless = True``: nothing is quantized beyond rounding to the storage dtype, so it is exact
for inputs already in that dtype (or narrower) - the 16-bit baseline the benchmarks compare against.
Fields: ``values [..., T, d]`` in the storage dtype.
"""

from __future__ import annotations

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed

__all__ = ["PlainCodec", "PLAIN_DTYPES"]

PLAIN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PlainCodec(Codec):
    lossless = True

    def __init__(self, dim: int, name: str = "fp16") -> None:
        if not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"{name} needs a positive integer dimension, got {dim!r}")
        self.name = name
        self.dim = dim
        self.storage = PLAIN_DTYPES[name]
        self.bits_per_value = 8.0 * torch.empty((), dtype=self.storage).element_size()

    def bytes_per_vector(self) -> int:
        return self.dim * torch.empty((), dtype=self.storage).element_size()

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        if self.storage == torch.float16 and x.numel() and float(x.abs().max()) > 65504.0:
            raise InvalidInput(f"{self.name}: values up to {float(x.abs().max()):.4g} overflow float16 storage")
        return Packed(self.name, tuple(x.shape), x.dtype, {"values": x.to(self.storage, copy=True).contiguous()})

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        return packed.fields["values"].to(packed.dtype)
