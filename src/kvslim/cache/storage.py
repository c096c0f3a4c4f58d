"""Storage of per-token vectors through a codec, growing at the back and trimmed at the front.

A codec turns ``x [b, h, n, d]`` into a *packed* value (a tensor, or a tuple/dict of tensors whose axis 2 is the
token axis) and back. Built-in codecs here: ``none`` (the compute dtype, lossless), ``fp32``/``fp16``/``bf16``
(plain casts) and ``fp8`` (e4m3 codes with one fp32 scale per block of 128 values, the shared byte contract:
``d + 4*ceil(d/128)`` bytes per vector). Every other name comes from ``kvslim.quant.make_codec``.

``Store`` holds one packed value per layer segment; ``append`` concatenates along tokens, ``drop_front`` slices,
``decode`` returns ``[b, h, n, d]`` in the compute dtype, ``nbytes`` counts exactly the bytes held.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InvalidInput
from ..memory import tensor_nbytes

__all__ = ["Store", "make_storage_codec", "packed_nbytes"]

_CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_E4M3_MAX = 448.0


class CastCodec:
    """Plain storage in a float dtype (``dtype=None``: keep the input dtype). Lossless when no narrowing happens."""

    per_token = True

    def __init__(self, name: str, dim: int, dtype: torch.dtype | None) -> None:
        self.name, self.dim, self.dtype = name, dim, dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None else x.to(self.dtype)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return packed

    def nbytes(self, packed: Any) -> int:
        return packed_nbytes(packed)

    def state_nbytes(self) -> int:
        return 0


class Fp8Codec:
    """FP8 e4m3 codes with one float32 absmax scale per block of 128 values along d (a kvslim-local baseline used
    until ``kvslim.quant`` provides its own ``fp8``)."""

    per_token = True
    block = 128

    def __init__(self, dim: int) -> None:
        self.name, self.dim = "fp8", dim
        self.nblocks = math.ceil(dim / self.block)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.shape[-1]
        pad = self.nblocks * self.block - d
        xf = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (self.nblocks, self.block))
        scale = xf.abs().amax(-1).clamp_min(1e-12) / _E4M3_MAX  # [..., nblocks]
        codes = (xf / scale[..., None]).to(torch.float8_e4m3fn).flatten(-2)[..., :d]
        return codes, scale

    def decode(self, packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        codes, scale = packed
        d = codes.shape[-1]
        pad = self.nblocks * self.block - d
        xf = torch.nn.functional.pad(codes.float(), (0, pad)).unflatten(-1, (self.nblocks, self.block))
        return (xf * scale[..., None]).flatten(-2)[..., :d]

    def nbytes(self, packed: Any) -> int:
        return packed_nbytes(packed)

    def state_nbytes(self) -> int:
        return 0


def make_storage_codec(name: str, dim: int, seed: int = 0) -> Any:
    """A codec for vectors of dimension ``dim``. Raises ``InvalidInput`` when ``name`` needs ``kvslim.quant`` and
    that module (or the name) is not available."""
    if name == "none":
        return CastCodec(name, dim, None)
    if name in _CASTS:
        return CastCodec(name, dim, _CASTS[name])
    try:
        from ..quant import make_codec  # type: ignore[attr-defined]
    except ImportError:
        make_codec = None
    if make_codec is not None:
        return make_codec(name, dim, seed=seed)
    if name == "fp8":
        return Fp8Codec(dim)
    raise InvalidInput(f"storage codec {name!r} needs kvslim.quant, which this build does not have; use none, fp16, bf16 or fp8")


def packed_nbytes(packed: Any) -> int:
    """Bytes of every tensor in a packed value (tensor, tuple/list, dict or object with tensor attributes)."""
    if packed is None:
        return 0
    if isinstance(packed, torch.Tensor):
        return tensor_nbytes(packed)
    if isinstance(packed, (tuple, list)):
        return sum(packed_nbytes(p) for p in packed)
    if isinstance(packed, dict):
        return sum(packed_nbytes(p) for p in packed.values())
    return sum(packed_nbytes(v) for v in vars(packed).values() if isinstance(v, (torch.Tensor, tuple, list, dict)))


def _map2(fn: Any, a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, tuple):
        return tuple(_map2(fn, x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return {k: _map2(fn, a[k], b[k]) for k in a}
    raise TypeError(f"cannot concatenate packed values of type {type(a).__name__}")


def _map1(fn: Any, a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return fn(a)
    if isinstance(a, tuple):
        return tuple(_map1(fn, x) for x in a)
    if isinstance(a, dict):
        return {k: _map1(fn, v) for k, v in a.items()}
    raise TypeError(f"cannot slice packed values of type {type(a).__name__}")


class Store:
    """Vectors ``[b, h, n, d]`` held through ``codec``; ``n`` grows by ``append`` and shrinks by ``drop_front``.

    Packed tensors keep the token axis at dim 2 (codecs work on the last axis, leading axes kept), so concatenation
    and slicing act on that axis directly.
    """

    def __init__(self, codec: Any, out_dtype: torch.dtype) -> None:
        self.codec = codec
        self.out_dtype = out_dtype
        self.packed: Any = None
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        if x.shape[2] == 0:
            return
        p = self.codec.encode(x)
        self.packed = p if self.packed is None else _map2(lambda a, b: torch.cat([a, b], dim=2), self.packed, p)
        self.n += x.shape[2]

    def drop_front(self, count: int) -> None:
        if count <= 0 or self.packed is None:
            return
        count = min(count, self.n)
        self.packed = _map1(lambda a: a[:, :, count:], self.packed)
        self.n -= count

    def decode(self) -> torch.Tensor | None:
        if self.packed is None or self.n == 0:
            return None
        return self.codec.decode(self.packed).to(self.out_dtype)

    def select_batch(self, fn: Any) -> None:
        if self.packed is not None:
            self.packed = _map1(fn, self.packed)

    def nbytes(self) -> int:
        return 0 if self.packed is None else int(self.codec.nbytes(self.packed))
