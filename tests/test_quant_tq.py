"""TurboQuant: distortion vs the paper, rotations, prod estimator unbiasedness/variance, scores, outlier splits."""

from __future__ import annotations

import math

import pytest
import torch

from kvslim.errors import InvalidInput
from kvslim.quant import make_codec
from kvslim.quant.rotation import HaarRotation, HadamardRotation, make_rotation
from kvslim.quant.tq_mse import TurboQuantMSE
from kvslim.quant.tq_prod import TurboQuantProd

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}  # TurboQuant Thm 1 / Lloyd-Max (fact sheet §2)


def unit_vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_on_unit_vectors_matches_paper(bits: int, rotation: str) -> None:
    x = unit_vectors(8192, 128, seed=bits)
    codec = make_codec(f"tq{bits}", 128, seed=3, rotation=rotation)
    err = ((codec.decode(codec.encode(x)) - x) ** 2).sum(-1).mean().item()
    assert abs(err - PAPER_MSE[bits]) <= 0.05 * PAPER_MSE[bits]
    assert err > 4.0**-bits  # Shannon lower bound, TurboQuant Thm 3


def test_rotations_are_orthogonal_and_hadamard_dense_equals_butterfly() -> None:
    x = torch.randn(50, 64)
    for rot in (HaarRotation(64, 1), HadamardRotation(64, 1)):
        y = rot.forward(x)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
        torch.testing.assert_close(rot.inverse(y), x, atol=1e-5, rtol=0)
    h = HadamardRotation(64, 1)
    torch.testing.assert_close(h.forward(x), h.butterfly_forward(x), atol=1e-5, rtol=0)
    # two rounds spread a one-hot vector over all coordinates
    assert (h.forward(torch.eye(64)[3]).abs() > 0).all()


def test_hadamard_refuses_non_power_of_two_and_auto_falls_back() -> None:
    with pytest.raises(InvalidInput, match="power-of-two"):
        HadamardRotation(96)
    with pytest.raises(InvalidInput, match="power-of-two"):
        make_codec("tq2", 96, rotation="hadamard")
    assert make_rotation(96).kind == "haar" and make_rotation(128).kind == "hadamard"
    codec = make_codec("tq3", 96)  # dense rotation at d = 96: still works, still the contract's bytes
    x = unit_vectors(512, 96)
    assert codec.nbytes(codec.encode(x)) == 512 * (36 + 2)


def test_same_seed_same_bytes_other_seed_other_codes() -> None:
    x = torch.randn(4, 32, 128)
    for name in ("tq3", "tqprod3", "tq2.5"):
        a, b, c = (make_codec(name, 128, seed=s).encode(x) for s in (7, 7, 8))
        for k in a.fields:
            assert torch.equal(a.fields[k], b.fields[k])
        assert any(not torch.equal(a.fields[k], c.fields[k]) for k in a.fields if k.startswith("codes"))


def test_norm_is_fp16_and_scaling_is_undone() -> None:
    codec = make_codec("tq4", 64)
    x = 37.0 * unit_vectors(256, 64)
    p = codec.encode(x)
    assert p.fields["norm"].dtype == torch.float16
    rel = ((codec.decode(p) - x) ** 2).sum(-1).mean() / 37.0**2
    assert rel < 0.012
    zero = codec.decode(codec.encode(torch.zeros(2, 64)))
    assert torch.equal(zero, torch.zeros(2, 64))


@pytest.mark.parametrize("name", ["tq1", "tq3", "tq2.5", "tq3.5", "tqprod2", "tqprod4"])
def test_score_from_codes_equals_decode_then_matmul(name: str) -> None:
    codec = make_codec(name, 128, seed=5)
    x = torch.randn(2, 3, 40, 128)
    q = torch.randn(2, 3, 6, 128)
    p = codec.encode(x)
    s = codec.score(q, p)
    assert s.shape == (2, 3, 6, 40)
    torch.testing.assert_close(s, q @ codec.decode(p).transpose(-1, -2), atol=2e-4, rtol=1e-4)


def _pair(d: int, cos: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g)
    x /= x.norm()
    z = torch.randn(d, generator=g)
    z -= (z @ x) * x
    z /= z.norm()
    return x, cos * x + math.sqrt(1 - cos**2) * z


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_estimator_is_unbiased_and_within_variance_bound(bits: int) -> None:
    d, n, cos = 128, 800, 0.6
    x, y = _pair(d, cos)
    errs = []
    for seed in range(n):  # fresh rotation and sketch per draw, as in TurboQuant Thm 2
        codec = TurboQuantProd(d, bits, seed=seed)
        errs.append(codec.score(y[None], codec.encode(x[None])).item() - cos)
    e = torch.tensor(errs, dtype=torch.float64)
    se = e.std().item() / math.sqrt(n)
    assert abs(e.mean().item()) < 3 * se
    bound = math.sqrt(3) * math.pi**2 / d * 4.0**-bits  # D_prod <= sqrt(3) pi^2 ||y||^2 / d * 4^-b
    assert e.pow(2).mean().item() <= bound


def test_mse_only_inner_products_are_biased_so_the_unbiasedness_test_has_power() -> None:
    d, n, cos = 128, 300, 0.6
    x, y = _pair(d, cos)
    errs = []
    for seed in range(n):
        codec = TurboQuantMSE(d, 2, seed=seed)
        errs.append(codec.score(y[None], codec.encode(x[None])).item() - cos)
    e = torch.tensor(errs, dtype=torch.float64)
    assert e.mean().item() < -10 * e.std().item() / math.sqrt(n)  # shrinks by ~D_mse: about -0.07
    assert e.mean().item() == pytest.approx(-cos * 0.116, abs=0.01)


def test_calibration_picks_high_energy_channels_and_helps() -> None:
    g = torch.Generator().manual_seed(1)
    hot = torch.tensor([3, 17, 40, 41, 90, 100, 101, 127] * 4)[:32].unique()
    scale = torch.ones(128)
    scale[hot] = 8.0
    calib = torch.randn(2048, 128, generator=g) * scale
    x = torch.randn(2048, 128, generator=g) * scale
    plain = make_codec("tq2.5", 128, seed=0)
    tuned = make_codec("tq2.5", 128, seed=0).calibrate(calib)
    assert set(hot.tolist()) <= set(tuned.outliers.tolist())
    assert tuned.outliers.numel() == 32 and tuned.inliers.numel() == 96
    assert plain.outliers.tolist() == list(range(32))  # documented default
    err = {k: ((c.decode(c.encode(x)) - x) ** 2).sum(-1).mean().item() for k, c in (("p", plain), ("t", tuned))}
    assert err["t"] < err["p"]
    assert tuned.state_nbytes() > 0


def test_fractional_rates_mix_the_two_distortions() -> None:
    x = unit_vectors(4096, 128, seed=9)
    errs = {}
    for name in ("tq2", "tq2.5", "tq3", "tq3.5", "tq4"):
        c = make_codec(name, 128, seed=2)
        errs[name] = ((c.decode(c.encode(x)) - x) ** 2).sum(-1).mean().item()
    assert errs["tq2"] > errs["tq2.5"] > errs["tq3"] > errs["tq3.5"] > errs["tq4"]
