"""Lloyd-Max scalar codebooks for the coordinates of a randomly rotated unit vector (TurboQuant §3.1, Eq. 4).

After a uniformly random rotation, each coordinate ``t`` of a unit vector in ``R^d`` has the density
(TurboQuant Lemma 1) ``f_d(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - t^2)^((d-3)/2)`` on ``[-1, 1]``,
which tends to ``N(0, 1/d)``. We solve the optimal ``2**b``-level quantizer (Lloyd-Max = 1-D k-means on the
density) numerically, in the scaled variable ``u = t * sqrt(d)`` (unit variance), on a fine grid:

* cell masses from the cumulative trapezoid integral of the density, first moments likewise;
* Lloyd iterations: thresholds = midpoints of neighbouring centroids, centroids = conditional means of the cells,
  until the largest centroid move is below ``1e-12``.

``law="beta"`` uses the exact density at dimension ``d`` (the default of the codecs: a 32-channel outlier instance
needs it); ``law="gaussian"`` the ``d -> inf`` limit (Max 1960; the values printed in TurboQuant and used by vLLM).
Results are cached per ``(bits, d, law)``; returned centroids are in the unit-variance scale (multiply by
``1/sqrt(d)`` for a unit vector's coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kvslim.errors import InvalidInput

__all__ = ["Codebook", "lloyd_max", "bucket"]

_GRID = 1 << 17  # grid points over [-L, L]
_SPAN = 13.0  # L = min(sqrt(d), 13) standard deviations; the Gaussian tail beyond 13 sd is < 1e-38


@dataclass(frozen=True)
class Codebook:
    """An optimal scalar quantizer in unit-variance scale.

    Attributes:
        bits: code width b; ``2**b`` levels.
        dim: vector dimension d the law is taken at (0 for the Gaussian limit).
        centroids: sorted reconstruction levels, float64 ``[2**b]``.
        thresholds: decision thresholds (midpoints), float64 ``[2**b - 1]``.
        mse: expected squared error per coordinate in unit-variance scale; for a unit vector the total
            distortion ``D_mse = E||x - x~||^2`` equals this number (``d`` coordinates of variance ``1/d``).
    """

    bits: int
    dim: int
    centroids: np.ndarray
    thresholds: np.ndarray
    mse: float


def _density(u: np.ndarray, dim: int, law: str) -> np.ndarray:
    if law == "gaussian":
        return np.exp(-0.5 * u * u)
    t2 = np.clip(u * u / dim, 0.0, 1.0)
    # (1 - t^2)^((d-3)/2) computed in log space; the normalising constant cancels in every ratio we use
    expo = (dim - 3) / 2.0
    with np.errstate(divide="ignore"):
        return np.exp(expo * np.log1p(-t2)) if expo != 0 else np.ones_like(u)


@lru_cache(maxsize=64)
def lloyd_max(bits: int, dim: int = 0, law: str = "beta") -> Codebook:
    """Solve the Lloyd-Max quantizer with ``2**bits`` levels.

    Args:
        bits: 1..8.
        dim: the dimension d of the rotated unit vectors (>= 3 for ``law="beta"``; ignored for ``"gaussian"``).
        law: ``"beta"`` (exact coordinate law at ``dim``) or ``"gaussian"`` (the large-d limit).
    """
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise InvalidInput(f"codebook bit width must be an integer in 1..8, got {bits!r}")
    if law not in ("beta", "gaussian"):
        raise InvalidInput(f"codebook law must be 'beta' or 'gaussian', got {law!r}")
    if law == "beta" and (not isinstance(dim, int) or dim < 3):
        raise InvalidInput(f"the exact coordinate law needs an integer dimension >= 3, got {dim!r}")
    span = _SPAN if law == "gaussian" else min(math.sqrt(dim), _SPAN)
    u = np.linspace(-span, span, _GRID + 1)
    f = _density(u, dim, law)
    h = u[1] - u[0]
    # cumulative integrals of f and u*f (trapezoid), normalised so that the total mass is 1
    cf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * (h / 2))])
    uf = u * f
    cu = np.concatenate([[0.0], np.cumsum((uf[1:] + uf[:-1]) * (h / 2))])
    total = cf[-1]
    cf /= total
    cu /= total
    second = float(np.sum((u * uf)[1:] + (u * uf)[:-1]) * (h / 2) / total)

    levels = 1 << bits
    # start from equal-mass cells
    q = (np.arange(levels) + 0.5) / levels
    c = np.interp(q, cf, u)
    for _ in range(20000):
        edges = np.concatenate([[u[0]], (c[1:] + c[:-1]) / 2, [u[-1]]])
        m = np.diff(np.interp(edges, u, cf))
        s = np.diff(np.interp(edges, u, cu))
        new = s / np.maximum(m, 1e-300)
        moved = float(np.max(np.abs(new - c)))
        c = new
        if moved < 1e-12:
            break
    c = (c - c[::-1]) / 2  # the law is symmetric: remove round-off asymmetry
    edges = np.concatenate([[u[0]], (c[1:] + c[:-1]) / 2, [u[-1]]])
    m = np.diff(np.interp(edges, u, cf))
    mse = second - float(np.sum(m * c * c))  # centroid condition: E[(X - Q(X))^2] = E[X^2] - sum p_i c_i^2
    return Codebook(bits=bits, dim=dim if law == "beta" else 0, centroids=c, thresholds=(c[1:] + c[:-1]) / 2, mse=mse)


def bucket(y: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Index of the cell each value falls in: ``uint8``, equal to ``torch.bucketize(y, thresholds)`` (a value equal
    to a threshold goes to the lower cell). One vectorised compare-and-add pass per threshold; on CPU this is 2-10x
    faster than ``torch.bucketize`` for the <= 15 thresholds of a 4-bit codebook. Float32 CPU input runs the same
    compares (thresholds rounded to float32, as ``torch.gt`` rounds a Python scalar) in the compiled kernel, in one
    pass over ``y`` instead of one per threshold."""
    from .kernels import bucket_count

    out = bucket_count(y, thresholds)  # None unless float32 on CPU with the compiled kernel
    if out is not None:
        return out
    acc = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    buf = torch.empty(y.shape, dtype=torch.bool, device=y.device)
    for t in thresholds:
        torch.gt(y, t, out=buf)
        acc.add_(buf)
    return acc
