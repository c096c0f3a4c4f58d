"""TurboQuant-prod (TurboQuant Alg. 2): (b-1)-bit TurboQuant-MSE plus a 1-bit QJL sketch of the residual.

Per vector: ``n = ||x||`` and ``u = x / n``; stage 1 is TurboQuant-MSE at ``b - 1`` bits in the rotated basis
(``y = Pi u``, ``idx``, ``c = c[idx]``); the residual ``r = y - c`` has norm ``gamma``; stage 2 stores
``qjl = sign(S r)`` with ``S`` an i.i.d. N(0,1) ``d x d`` matrix (seeded). Because ``Pi`` is orthogonal, ``S`` acting
on the rotated residual is the same as the Gaussian sketch ``S Pi`` acting on the residual in the original basis, so
this is Alg. 2 exactly. Inner-product estimate (TurboQuant Thm 2; QJL Lemma 3.2), unbiased over ``S``:

    <q, x~> = n * ( <Pi q, c> + gamma * sqrt(pi/2) / d * <S Pi q, qjl> )

Stored bytes per vector: ``ceil(d*(b-1)/8) + ceil(d/8) + 4``. Fields: ``codes uint8``, ``qjl uint8`` (1 bit per
projection, bit 1 = non-negative), ``norm fp16 [..., T, 1]``, ``rnorm fp16 [..., T, 1]``.
``score`` rotates and sketches each query once and works from the codes; ``decode`` materialises
``n * Pi^T (c + gamma sqrt(pi/2)/d * S^T qjl)`` (the dequantised vector of Alg. 2).
"""

from __future__ import annotations

import math

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed
from kvslim.quant.kernels import lookup_mix, lookup_score
from kvslim.quant.packing import pack_bits, packed_len, unpack_bits
from kvslim.quant.tq_mse import TurboQuantMSE

__all__ = ["TurboQuantProd"]

_SKETCH_SEED_OFFSET = 0x5EED_0001


class TurboQuantProd(Codec):
    """TurboQuant-prod at ``bits`` = 2..8 total bits per coordinate ((b-1)-bit MSE codes + 1 QJL bit)."""

    has_fast_score = True
    attends_from_codes = True

    def __init__(self, dim: int, bits: int, seed: int = 0, rotation: str = "auto", law: str = "beta") -> None:
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise InvalidInput(f"TurboQuant-prod needs 2..8 bits ((b-1)-bit MSE stage + 1 QJL bit), got {bits!r}")
        self.mse = TurboQuantMSE(dim, bits - 1, seed, rotation, law, name=f"tqprod{bits}.mse")
        self.name = f"tqprod{bits}"
        self.dim = dim
        self.bits = bits
        self.bits_per_value = float(bits)
        g = torch.Generator(device="cpu")
        g.manual_seed((int(seed) + _SKETCH_SEED_OFFSET) % (1 << 63))
        self.sketch = torch.randn(dim, dim, generator=g, dtype=torch.float32)  # S [m = d, d]
        self._qjl_scale = math.sqrt(math.pi / 2) / dim
        self._signs_lut = torch.tensor([-1.0, 1.0])  # QJL bit 0 / 1 -> sign

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.sketch]

    def state_nbytes(self) -> int:
        return super().state_nbytes() + self.mse.state_nbytes()

    def bytes_per_vector(self) -> int:
        return packed_len(self.dim, self.bits - 1) + packed_len(self.dim, 1) + 4

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        idx, y, n = self.mse.quantize_rotated(x.to(torch.float32))
        r = y - self.mse.centroids[idx.long()]
        gamma = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
        signs = (r @ self.sketch.t()) >= 0
        fields = {
            "codes": pack_bits(idx, self.bits - 1),
            "qjl": pack_bits(signs.to(torch.uint8), 1),
            "norm": n.to(torch.float16),
            "rnorm": gamma.to(torch.float16),
        }
        return Packed(self.name, tuple(x.shape), x.dtype, fields)

    def _signs(self, packed: Packed) -> torch.Tensor:
        bits = unpack_bits(packed.fields["qjl"], 1, self.dim)
        return bits.to(torch.float32) * 2 - 1

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        y = self.mse.lookup(packed.fields["codes"])
        gamma = packed.fields["rnorm"].to(torch.float32)
        y = y + (self._signs(packed) @ self.sketch) * (gamma * self._qjl_scale)
        return (self.mse.rotation.inverse(y) * packed.fields["norm"].to(torch.float32)).to(packed.dtype)

    def _qjl_weights(self, packed: Packed) -> torch.Tensor:
        """Per-token weight of the sign stage, ``n * gamma * sqrt(pi/2)/d`` float32 ``[..., T, 1]``."""
        f = packed.fields
        return f["norm"].to(torch.float32) * f["rnorm"].to(torch.float32) * self._qjl_scale

    def score_f32(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Unbiased ``<q, x>`` estimates ``[..., Q, T]`` from the codes: one rotation + one sketch per query."""
        f, m = packed.fields, self.mse
        qr = m.rotation.forward(q)  # [..., Q, d]
        s = lookup_score(qr, f["codes"], self.bits - 1, m.centroids, self.dim, f["norm"])
        return s + lookup_score(qr @ self.sketch.t(), f["qjl"], 1, self._signs_lut, self.dim, self._qjl_weights(packed))

    def mix_f32(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        """``w [..., Q, T]`` x packed -> ``[..., Q, d]``: ``Pi^T (sum_t w_t n_t c_t + (sum_t w_t n_t g_t s_t) S)``
        with ``g_t = gamma_t sqrt(pi/2)/d`` and ``s_t`` the +-1 signs; one sketch and one rotation per query row."""
        f, m = packed.fields, self.mse
        mixed = lookup_mix(w, f["codes"], self.bits - 1, m.centroids, self.dim, f["norm"])
        signs = lookup_mix(w, f["qjl"], 1, self._signs_lut, self.dim, self._qjl_weights(packed))
        return m.rotation.inverse(mixed + signs @ self.sketch)
