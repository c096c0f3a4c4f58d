"""Seeded random rotations for TurboQuant (TurboQuant §3.1, Alg. 1 line 2).

* :class:`HaarRotation` - the paper's rotation: the Q factor of the QR decomposition of an i.i.d. N(0,1) matrix,
  sign-corrected so it is Haar-distributed. Any dimension. State: one float32 ``d x d`` matrix.
* :class:`HadamardRotation` - randomized Hadamard transform ``x -> H D_2 H D_1 x / d`` (two rounds of random
  +-1 signs and a normalised Walsh-Hadamard transform). The transform is defined by the ``2 x d`` signs; it is
  built once with the ``O(d log d)`` butterfly and then applied as one dense ``d x d`` float32 matmul, because on
  CPU at d <= 256 a BLAS matmul is ~10-30x faster than a butterfly written with torch ops (measured while writing
  this module: 4.7 vs 0.25 M vectors/s at d=128); the held matrix counts in ``state_nbytes``. Needs ``d`` a power
  of two and refuses other sizes (padding would change the number of stored codes and so the byte contract);
  :func:`make_rotation` with ``kind="auto"`` falls back to Haar for them. It is
  orthogonal, so norms and inner products are preserved; the exact Beta coordinate law holds for Haar rotations
  and approximately here (two rounds mix even one-hot inputs to all coordinates).

Both act on the last axis of float32 tensors ``[..., d]``; ``inverse`` is the transpose.
"""

from __future__ import annotations

import torch

from kvslim.errors import InvalidInput

__all__ = ["HaarRotation", "HadamardRotation", "make_rotation", "is_power_of_two"]


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


class _MatrixRotation:
    """An orthogonal rotation held as a dense float32 matrix ``[d, d]``: ``forward(x) = x @ matrix^T``."""

    matrix: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.t()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix


class HaarRotation(_MatrixRotation):
    """Dense Haar-random orthogonal matrix ``Pi`` (float32 ``[d, d]``); ``forward(x) = x @ Pi^T``."""

    kind = "haar"

    def __init__(self, dim: int, seed: int = 0) -> None:
        g = _generator(seed)
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar measure (Mezzadri 2007)
        self.dim = dim
        self.matrix = q.to(torch.float32).contiguous()

    def to(self, device: torch.device | str) -> HaarRotation:
        self.matrix = self.matrix.to(device)
        return self


    def state_nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last axis (length a power of two)."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(x.numel() // d, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d)


class HadamardRotation(_MatrixRotation):
    """Randomized Hadamard rotation ``H D_2 H D_1 / d`` with seeded +-1 diagonals (float32 signs ``[2, d]``),
    applied through its dense float32 matrix ``[d, d]`` (built once from the signs by the butterfly)."""

    kind = "hadamard"

    def __init__(self, dim: int, seed: int = 0) -> None:
        if not is_power_of_two(dim):
            raise InvalidInput(
                f"the Hadamard rotation needs a power-of-two dimension, got {dim}; padding would change the number "
                "of stored codes, so use rotation='haar' (dense, any dimension) or 'auto'"
            )
        g = _generator(seed)
        self.dim = dim
        self.signs = (torch.randint(0, 2, (2, dim), generator=g) * 2 - 1).to(torch.float32)
        eye = torch.eye(dim, dtype=torch.float64)
        rows = _fwht(_fwht(eye * self.signs[0].double()) * self.signs[1].double()) / dim  # row i = forward(e_i)
        self.matrix = rows.t().to(torch.float32).contiguous()  # forward(x) = x @ matrix^T

    def to(self, device: torch.device | str) -> HadamardRotation:
        self.signs = self.signs.to(device)
        self.matrix = self.matrix.to(device)
        return self


    def butterfly_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same transform through the O(d log d) butterfly (a reference for the dense path)."""
        y = _fwht(x * self.signs[0])
        return _fwht(y * self.signs[1]) / self.dim

    def state_nbytes(self) -> int:
        return (self.signs.numel() + self.matrix.numel()) * 4


def make_rotation(dim: int, seed: int = 0, kind: str = "auto") -> HaarRotation | HadamardRotation:
    """``kind``: ``"hadamard"``, ``"haar"``, or ``"auto"`` (Hadamard for powers of two, else Haar)."""
    if kind == "auto":
        kind = "hadamard" if is_power_of_two(dim) else "haar"
    if kind == "hadamard":
        return HadamardRotation(dim, seed)
    if kind == "haar":
        return HaarRotation(dim, seed)
    raise InvalidInput(f"unknown rotation {kind!r}; use 'hadamard', 'haar' or 'auto'")
