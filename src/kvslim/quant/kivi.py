"""KIVI (Liu et al., ICML 2024, §3.2-3.3): asymmetric min-max quantization, keys per channel, values per token.

:class:`KiviCodec` quantizes complete blocks; :class:`KiviStore` is the streaming form a cache uses.

* ``role="key"``: groups of ``G`` (=32) consecutive tokens; per group and channel an fp16 ``scale`` and ``zero``
  (``zero = min``, ``scale = (max - min) / (2**b - 1)``); codes ``round((x - zero) / scale)`` packed b bits per
  token. ``encode`` needs ``T % G == 0``. Bytes per token: ``ceil(d*b/8) + 4*d/G`` (amortised).
  Fields: ``codes uint8 [..., T, ceil(d*b/8)]``, ``scale/zero fp16 [..., T/G, d]`` (grouped by G tokens).
* ``role="value"``: per token, groups of 32 channels (the last may be shorter), fp16 scale+zero per group.
  Bytes per token: ``ceil(d*b/8) + 4*ceil(d/32)``. Fields: ``codes``, ``scale/zero fp16 [..., T, ceil(d/32)]``.

Codes are computed against the fp16-rounded scale and zero, so decode is consistent with what is stored.

Streaming (:class:`KiviStore`, KIVI §3.3): tokens are appended as they come; the most recent ones stay in an fp16
residual. Keys: when the residual reaches ``R`` (=128, a multiple of G) tokens, all ``R`` are quantized (``R/G``
groups), so ``T mod R`` key tokens are fp16 at any time. Values: a FIFO of the ``R`` most recent tokens in fp16;
older tokens are quantized per token as they leave, so ``min(T, R)`` value tokens are fp16.
:func:`kivi_store_nbytes` gives the resulting bytes for ``T`` tokens (the store's ``nbytes()`` equals it).
"""

from __future__ import annotations

import math

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed
from kvslim.quant.kernels import lookup_mix, lookup_score
from kvslim.quant.packing import pack_bits, packed_len, unpack_bits

__all__ = ["KiviCodec", "KiviStore", "kivi_store_nbytes"]

ROLES = ("key", "value")


class KiviCodec(Codec):
    """KIVI-``bits`` for keys (per channel over ``group`` tokens) or values (per token over 32 channels). Keys are
    scored and values mixed from the codes (``score_f32`` / ``mix_f32``); the other direction decodes."""

    attends_from_codes = True

    def __init__(self, dim: int, bits: int, role: str = "key", group: int = 32, residual: int = 128) -> None:
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise InvalidInput(f"KIVI supports 1..8 bits, got {bits!r}")
        if role not in ROLES:
            raise InvalidInput(f"KIVI role must be 'key' or 'value', got {role!r}")
        if not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"KIVI needs a positive integer dimension, got {dim!r}")
        if not isinstance(group, int) or group < 1:
            raise InvalidInput(f"KIVI group size must be a positive integer, got {group!r}")
        if role == "key" and (residual < group or residual % group):
            raise InvalidInput(f"KIVI residual window R={residual} must be a positive multiple of the group G={group}")
        if residual < 0:
            raise InvalidInput(f"KIVI residual window must be >= 0, got {residual}")
        self.name = f"kivi{bits}"
        self.dim = dim
        self.bits = bits
        self.bits_per_value = float(bits)
        self.role = role
        self.group = group
        self.residual = residual
        self.cgroups = -(-dim // 32)

    def bytes_per_vector(self) -> float:
        codes = packed_len(self.dim, self.bits)
        if self.role == "key":
            return codes + 4 * self.dim / self.group
        return codes + 4 * self.cgroups

    def _quantize(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple:
        """x, lo, hi broadcastable float32 -> (codes uint8, scale fp16, zero fp16)."""
        levels = (1 << self.bits) - 1
        zero = lo.to(torch.float16)
        scale = ((hi - lo) / levels).to(torch.float16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((x - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
        return q, scale, zero

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        if x.ndim < 2:
            raise InvalidInput(f"{self.name}: encode [..., T, {self.dim}] tensors (a token axis is needed)")
        xf = x.to(torch.float32)
        t = x.shape[-2]
        lead = x.shape[:-2]
        if self.role == "key":
            if t % self.group:
                raise InvalidInput(
                    f"{self.name} keys are quantized in whole groups of {self.group} tokens, got T={t}; "
                    "use KiviStore, which keeps the remainder in fp16"
                )
            xg = xf.reshape(*lead, t // self.group, self.group, self.dim)
            q, scale, zero = self._quantize(xg, xg.amin(dim=-2, keepdim=True), xg.amax(dim=-2, keepdim=True))
            fields = {"codes": pack_bits(q.reshape(*lead, t, self.dim), self.bits),
                      "scale": scale.squeeze(-2), "zero": zero.squeeze(-2)}
            return Packed(self.name, tuple(x.shape), x.dtype, fields, grouped=("scale", "zero"), group=self.group)
        pad = self.cgroups * 32 - self.dim
        lo_in = torch.nn.functional.pad(xf, (0, pad), value=math.inf) if pad else xf
        hi_in = torch.nn.functional.pad(xf, (0, pad), value=-math.inf) if pad else xf
        lo = lo_in.reshape(*lead, t, self.cgroups, 32).amin(dim=-1)
        hi = hi_in.reshape(*lead, t, self.cgroups, 32).amax(dim=-1)
        idx = torch.arange(self.dim, device=x.device) // 32
        q, scale, zero = self._quantize(xf, lo[..., idx], hi[..., idx])
        cg = torch.arange(self.cgroups, device=x.device) * 32
        fields = {"codes": pack_bits(q, self.bits), "scale": scale[..., cg], "zero": zero[..., cg]}
        return Packed(self.name, tuple(x.shape), x.dtype, fields)

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        q = unpack_bits(packed.fields["codes"], self.bits, self.dim).to(torch.float32)
        scale = packed.fields["scale"].to(torch.float32)
        zero = packed.fields["zero"].to(torch.float32)
        if packed.grouped:  # keys: one row of scale/zero per G tokens
            scale = scale.repeat_interleave(self.group, dim=-2)[..., : q.shape[-2], :]
            zero = zero.repeat_interleave(self.group, dim=-2)[..., : q.shape[-2], :]
        else:
            idx = torch.arange(self.dim, device=q.device) // 32
            scale, zero = scale[..., idx], zero[..., idx]
        return (q * scale + zero).to(packed.dtype)

    def _levels(self, device: torch.device) -> torch.Tensor:
        return torch.arange(1 << self.bits, dtype=torch.float32, device=device)

    def score_f32(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Keys from the codes: per group of G tokens ``q . (code * scale + zero) = (q * scale) . code + q . zero``,
        so each query is scaled once per group and the codes are read through the table ``0..2^b-1``."""
        if not packed.grouped:
            return super().score_f32(q, packed)
        f, t = packed.fields, packed.tokens
        scale, zero = f["scale"].to(torch.float32), f["zero"].to(torch.float32)  # [..., T/G, d]
        qs = q.unsqueeze(-3) * scale.unsqueeze(-2)  # [..., T/G, Q, d]
        s = lookup_score(qs, f["codes"], self.bits, self._levels(q.device), self.dim, qgroup=self.group)
        shift = (q @ zero.transpose(-1, -2)).repeat_interleave(self.group, dim=-1)[..., :t]  # [..., Q, T]
        return s + shift

    def mix_f32(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Values from the codes: ``sum_t w_t (code_t * scale_t + zero_t)`` with scale and zero per 32 channels."""
        if packed.grouped:
            return super().mix_f32(w, packed)
        f = packed.fields
        mixed = lookup_mix(w, f["codes"], self.bits, self._levels(w.device), self.dim, f["scale"], 32)
        shift = (w @ f["zero"].to(torch.float32)).repeat_interleave(32, dim=-1)[..., : self.dim]
        return mixed + shift

    def _check_packed(self, packed: Packed) -> None:
        super()._check_packed(packed)
        if bool(packed.grouped) != (self.role == "key"):
            raise InvalidInput(f"{self.name}: packed data was written for the other role (keys vs values)")


def kivi_store_nbytes(tokens: int, dim: int, bits: int, role: str, group: int = 32, residual: int = 128) -> int:
    """Bytes a :class:`KiviStore` holds after ``tokens`` tokens (per leading index: one head of one sequence)."""
    codes = packed_len(dim, bits)
    if role == "key":
        fp = tokens % residual
        q = tokens - fp
        return q * codes + (q // group) * 4 * dim + fp * 2 * dim
    fp = min(tokens, residual)
    q = tokens - fp
    return q * (codes + 4 * -(-dim // 32)) + fp * 2 * dim


class KiviStore:
    """Streaming KIVI storage for one tensor stream (keys or values of one layer), ``[..., T, d]``.

    ``append(x)`` adds tokens ``[..., t, d]``; ``materialize()`` returns all ``T`` tokens ``[..., T, d]`` (dequantised
    prefix, then the fp16 residual) in the dtype of the first append; ``nbytes()`` = packed codes + scales + the
    fp16 residual; ``len(store)`` = tokens appended. See the module docstring for when tokens get quantized.
    """

    def __init__(self, codec: KiviCodec) -> None:
        if not isinstance(codec, KiviCodec):
            raise InvalidInput(f"KiviStore needs a KiviCodec, got {type(codec).__name__}")
        self.codec = codec
        self.quantized: Packed | None = None
        self.recent: torch.Tensor | None = None  # fp16 residual [..., r, d]
        self.dtype: torch.dtype | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, x: torch.Tensor) -> None:
        c = self.codec
        c._check(x)
        if x.ndim < 2:
            raise InvalidInput("KiviStore.append takes [..., t, d] tensors")
        if self.recent is not None and x.shape[:-2] != self.recent.shape[:-2]:
            raise InvalidInput(f"KiviStore: appended leading shape {list(x.shape[:-2])} differs from "
                               f"{list(self.recent.shape[:-2])}")
        if self.dtype is None:
            self.dtype = x.dtype
        new = x.to(torch.float16)
        recent = new if self.recent is None else torch.cat([self.recent, new], dim=-2)
        r = recent.shape[-2]
        if c.role == "key":
            n_out = (r // c.residual) * c.residual
        else:
            n_out = max(0, r - c.residual)
        if n_out:
            packed = c.encode(recent[..., :n_out, :])
            self.quantized = packed if self.quantized is None else Packed.cat([self.quantized, packed])
            recent = recent[..., n_out:, :].clone()
        self.recent = recent
        self.length += x.shape[-2]

    def materialize(self) -> torch.Tensor:
        if self.recent is None:
            raise InvalidInput("KiviStore is empty: append tokens first")
        parts = []
        if self.quantized is not None:
            parts.append(self.codec.decode(self.quantized).to(self.dtype))
        parts.append(self.recent.to(self.dtype))
        return torch.cat(parts, dim=-2)

    def nbytes(self) -> int:
        total = 0 if self.quantized is None else self.quantized.nbytes()
        if self.recent is not None:
            total += self.recent.numel() * self.recent.element_size()
        return total
