"""TurboQuant-MSE (TurboQuant Alg. 1): rotate, quantize each coordinate with a Lloyd-Max codebook, store the norm.

Per vector ``x [d]``: ``n = ||x||`` (stored as **float16**), ``u = x / n``, ``y = Pi u`` (seeded random rotation,
:mod:`kvslim.quant.rotation`), ``idx_j = argmin_i |y_j - c_i|`` over the ``2**b``-level codebook of
:mod:`kvslim.quant.codebooks` at dimension d, scaled by ``1/sqrt(d)`` (found by comparing with the midpoints), packed ``b`` bits per coordinate
(:mod:`kvslim.quant.packing`). Decode: ``x~ = n * Pi^T c[idx]``.
Stored bytes per vector: ``ceil(d*b/8) + 2``. Fields: ``codes uint8 [..., T, ceil(d*b/8)]``, ``norm fp16 [..., T, 1]``.

``score(q, packed)`` never forms ``x~``: it rotates the queries once (``Pi q``) and takes inner products with the
looked-up centroids in the rotated basis, ``<q, x~> = n * <Pi q, c[idx]>``. ``weighted_sum(w, packed)`` (attention
over values) mixes in the rotated basis and rotates back once per query row: ``Pi^T sum_t w_t n_t c[idx_t]``.
"""

from __future__ import annotations

import math

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed
from kvslim.quant.codebooks import bucket, lloyd_max
from kvslim.quant.kernels import lookup_mix, lookup_score
from kvslim.quant.packing import pack_bits, packed_len, unpack_bits
from kvslim.quant.rotation import make_rotation

__all__ = ["TurboQuantMSE", "FP16_MAX"]

FP16_MAX = 65504.0
_SMALL = 4096  # values below which encode buckets with torch.bucketize


def vector_norms(x: torch.Tensor, codec: str) -> torch.Tensor:
    """float32 L2 norms ``[..., 1]``, refusing vectors whose norm overflows the float16 it is stored in."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if n.numel() and float(n.max()) > FP16_MAX:
        raise InvalidInput(
            f"{codec}: a vector norm of {float(n.max()):.4g} exceeds the float16 range ({FP16_MAX:g}) of the stored norm; "
            "scale the input down"
        )
    return n


class TurboQuantMSE(Codec):
    """TurboQuant-MSE at ``bits`` = 1..8 bits per coordinate (tested at 1..4).

    Args:
        dim: vector dimension d (>= 3).
        bits: code width b.
        seed: seeds the rotation.
        rotation: ``"auto"`` (randomized Hadamard for powers of two, dense Haar otherwise), ``"hadamard"``, ``"haar"``.
        law: codebook law, ``"beta"`` (exact at d, default) or ``"gaussian"`` (large-d limit).
    """

    has_fast_score = True
    attends_from_codes = True

    def __init__(self, dim: int, bits: int, seed: int = 0, rotation: str = "auto", law: str = "beta",
                 name: str | None = None) -> None:
        if not isinstance(dim, int) or dim < 3:
            raise InvalidInput(f"TurboQuant needs an integer dimension >= 3, got {dim!r}")
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise InvalidInput(f"TurboQuant-MSE supports 1..8 bits per coordinate, got {bits!r}")
        self.name = name or f"tq{bits}"
        self.dim = dim
        self.bits = bits
        self.bits_per_value = float(bits)
        cb = lloyd_max(bits, dim, law)
        scale = 1.0 / math.sqrt(dim)
        self.centroids = torch.tensor(cb.centroids * scale, dtype=torch.float32)
        self.thresholds = torch.tensor(cb.thresholds * scale, dtype=torch.float32)
        self._thresholds = self.thresholds.tolist()  # python floats for the compare passes of `bucket`
        # byte -> the centroids of its 8/bits codes (widths that pack whole codes per byte): a decode looks up
        # every packed byte once instead of unpacking it first (the same values, about 2x faster on CPU)
        self._byte_lut = None
        if 8 % bits == 0:
            every_byte = torch.arange(256, dtype=torch.uint8)[:, None]
            self._byte_lut = torch.take(self.centroids, unpack_bits(every_byte, bits, 8 // bits).long())
        self.rotation = make_rotation(dim, seed, rotation)
        self.law = law
        self.expected_mse = cb.mse  # D_mse for unit vectors under an exactly Haar rotation

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.centroids, self.thresholds]

    def state_nbytes(self) -> int:
        return super().state_nbytes() + self.rotation.state_nbytes()

    def bytes_per_vector(self) -> int:
        return packed_len(self.dim, self.bits) + 2

    # -- building blocks shared with the prod and split codecs -----------------------------------------------------
    def quantize_rotated(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 ``[..., d]`` -> (indices uint8 ``[..., d]``, rotated unit vectors ``y``, float32 norms ``[..., 1]``)."""
        n = vector_norms(xf, self.name)
        u = xf / torch.where(n > 0, n, torch.ones_like(n))
        y = self.rotation.forward(u)
        if y.numel() > _SMALL:
            idx = bucket(y, self._thresholds)
        else:  # a decode step's few vectors: one bucketize beats a compare pass per threshold (same cells, ties low)
            idx = torch.bucketize(y, self.thresholds).to(torch.uint8)
        return idx, y, n

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed codes ``[..., nbytes]`` -> centroid values in the rotated basis, float32 ``[..., d]``."""
        if self._byte_lut is not None and self._byte_lut.device == codes.device:
            per = self._byte_lut.shape[1]
            y = self._byte_lut.index_select(0, codes.reshape(-1).long()).reshape(*codes.shape[:-1], codes.shape[-1] * per)
            return y if codes.shape[-1] * per == self.dim else y[..., : self.dim].contiguous()
        return torch.take(self.centroids, unpack_bits(codes, self.bits, self.dim).long())

    # -- codec API ------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        idx, _, n = self.quantize_rotated(x.to(torch.float32))
        fields = {"codes": pack_bits(idx, self.bits), "norm": n.to(torch.float16)}
        return Packed(self.name, tuple(x.shape), x.dtype, fields)

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        y = self.lookup(packed.fields["codes"])
        return (self.rotation.inverse(y) * packed.fields["norm"].to(torch.float32)).to(packed.dtype)

    def score_f32(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        """``q [..., Q, d]`` x packed ``[..., T, d]`` -> ``[..., Q, T]`` float32 from the codes (rotated basis)."""
        f = packed.fields
        return lookup_score(self.rotation.forward(q), f["codes"], self.bits, self.centroids, self.dim, f["norm"])

    def mix_f32(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        """``w [..., Q, T]`` x packed ``[..., T, d]`` -> ``[..., Q, d]`` float32: mix the centroids in the rotated
        basis (``sum_t w_t n_t c[idx_t]``), then one inverse rotation per query row."""
        f = packed.fields
        return self.rotation.inverse(lookup_mix(w, f["codes"], self.bits, self.centroids, self.dim, f["norm"]))
