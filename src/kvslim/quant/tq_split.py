"""Fractional TurboQuant rates (TurboQuant §4.3): outlier channels at a higher rate, two independent instances.

``tq2.5``: ``d/4`` outlier channels at 3 bits + ``3d/4`` channels at 2 bits (d = 128: 32 x 3 + 96 x 2 = 320 bits).
``tq3.5``: ``d/2`` outlier channels at 4 bits + ``d/2`` at 3 bits. Each instance is a full TurboQuant-MSE of its own
dimension (own rotation, own exact-Beta codebook at that dimension, own fp16 norm). Stored bytes per vector:
``ceil(k*b_hi/8) + ceil((d-k)*b_lo/8) + 4``. Fields: ``codes_hi``, ``norm_hi``, ``codes_lo``, ``norm_lo``.

Outlier channels: :meth:`TurboQuantSplit.calibrate` takes calibration vectors ``[..., d]`` and picks the ``k``
channels with the largest mean square (the channels that carry most of the energy, where a coarse code costs most;
the paper credits QJL/RotateKV for outlier detection but does not state its rule). Without calibration the outlier
set is channels ``0..k-1`` (any fixed set is as good as another for isotropic data). The chosen indices are part
of the codec state (``int16``, counted in ``state_nbytes``).
"""

from __future__ import annotations

import torch

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec, Packed, check_input
from kvslim.quant.tq_mse import TurboQuantMSE

__all__ = ["TurboQuantSplit"]


class TurboQuantSplit(Codec):
    """Two TurboQuant-MSE instances over a channel split: ``n_hi`` outlier channels at ``hi`` bits, rest at ``lo``."""

    has_fast_score = True
    attends_from_codes = True

    def __init__(self, dim: int, name: str, hi: int, lo: int, n_hi: int, seed: int = 0, rotation: str = "auto",
                 law: str = "beta") -> None:
        if not 3 <= n_hi <= dim - 3:
            raise InvalidInput(
                f"{name} splits d={dim} into {n_hi} outlier + {dim - n_hi} channels; each part needs >= 3 channels"
            )
        self.name = name
        self.dim = dim
        self.n_hi = n_hi
        self.bits_per_value = (n_hi * hi + (dim - n_hi) * lo) / dim
        self.hi = TurboQuantMSE(n_hi, hi, seed * 2 + 1, rotation, law, name=f"{name}.hi")
        self.lo = TurboQuantMSE(dim - n_hi, lo, seed * 2 + 2, rotation, law, name=f"{name}.lo")
        self._set_channels(torch.arange(n_hi))
        self.calibrated = False

    def _set_channels(self, outliers: torch.Tensor) -> None:
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[outliers.cpu()] = True
        self.outliers = torch.nonzero(mask).flatten().to(torch.int16).to(self.device)
        self.inliers = torch.nonzero(~mask).flatten().to(torch.int16).to(self.device)

    def calibrate(self, x: torch.Tensor) -> TurboQuantSplit:
        """Choose the outlier channels from calibration vectors ``x [..., d]`` (largest mean square); returns self."""
        check_input(x, self.dim, self.name, self.device, "calibration data")
        if x.numel() == 0:
            raise InvalidInput(f"{self.name}: calibration data is empty")
        energy = x.to(torch.float32).reshape(x.numel() // self.dim, self.dim).pow(2).mean(dim=0)
        self._set_channels(torch.topk(energy, self.n_hi).indices)
        self.calibrated = True
        return self

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.outliers, self.inliers]

    def state_nbytes(self) -> int:
        return super().state_nbytes() + self.hi.state_nbytes() + self.lo.state_nbytes()

    def bytes_per_vector(self) -> int:
        return self.hi.bytes_per_vector() + self.lo.bytes_per_vector()

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        xf = x.to(torch.float32)
        ph = self.hi.encode(xf[..., self.outliers.long()])
        pl = self.lo.encode(xf[..., self.inliers.long()])
        fields = {
            "codes_hi": ph.fields["codes"], "norm_hi": ph.fields["norm"],
            "codes_lo": pl.fields["codes"], "norm_lo": pl.fields["norm"],
        }
        return Packed(self.name, tuple(x.shape), x.dtype, fields)

    def _parts(self, packed: Packed) -> tuple[Packed, Packed]:
        f = packed.fields
        lead = packed.shape[:-1]
        ph = Packed(self.hi.name, (*lead, self.n_hi), torch.float32, {"codes": f["codes_hi"], "norm": f["norm_hi"]})
        pl = Packed(self.lo.name, (*lead, self.dim - self.n_hi), torch.float32,
                    {"codes": f["codes_lo"], "norm": f["norm_lo"]})
        return ph, pl

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        ph, pl = self._parts(packed)
        out = torch.empty(*packed.shape, dtype=torch.float32, device=packed.device)
        out[..., self.outliers.long()] = self.hi.decode(ph)
        out[..., self.inliers.long()] = self.lo.decode(pl)
        return out.to(packed.dtype)

    def score_f32(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        ph, pl = self._parts(packed)
        return self.hi.score_f32(q[..., self.outliers.long()], ph) + self.lo.score_f32(q[..., self.inliers.long()], pl)

    def mix_f32(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        ph, pl = self._parts(packed)
        out = torch.empty(*w.shape[:-1], self.dim, dtype=torch.float32, device=w.device)
        out[..., self.outliers.long()] = self.hi.mix_f32(w, ph)
        out[..., self.inliers.long()] = self.lo.mix_f32(w, pl)
        return out
