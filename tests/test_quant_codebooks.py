"""Lloyd-Max codebooks computed in code vs the published / reference values (fact sheet §1-2)."""

from __future__ import annotations

import numpy as np
import pytest

from kvslim.errors import InvalidInput
from kvslim.quant.codebooks import lloyd_max

# Max (1960) / TurboQuant §3.1 / vLLM centroids.py: positive half of the unit-Gaussian Lloyd-Max quantizer
GAUSSIAN = {
    1: ([0.7979], [0.0], 0.3634),
    2: ([0.4528, 1.5104], [0.0, 0.9816], 0.1175),
    3: ([0.2451, 0.7560, 1.3439, 2.1519], [0.0, 0.5005, 1.0500, 1.7479], 0.03455),
    4: (
        [0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326],
        [0.0, 0.2582, 0.5224, 0.7995, 1.0993, 1.4371, 1.8435, 2.4008],
        0.00950,
    ),
}
# exact Beta law at d = 128, sqrt(d) * c_i (fact sheet §1, "Exact-Beta solve at d = 128")
BETA128 = {
    1: [0.7994],
    2: [0.4525, 1.5052],
    3: [0.2444, 0.7533, 1.3366, 2.1315],
    4: [0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6888],
}
BETA128_MSE = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_limit_matches_published_centroids(bits: int) -> None:
    cb = lloyd_max(bits, law="gaussian")
    cents, thr, mse = GAUSSIAN[bits]
    half = len(cb.centroids) // 2
    np.testing.assert_allclose(cb.centroids[half:], cents, atol=1.5e-4)
    np.testing.assert_allclose(cb.thresholds[half - 1 :], thr, atol=1.5e-4)
    assert cb.mse == pytest.approx(mse, abs=6e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_beta_law_at_128_matches_reference_solve(bits: int) -> None:
    cb = lloyd_max(bits, 128, "beta")
    half = len(cb.centroids) // 2
    np.testing.assert_allclose(cb.centroids[half:], BETA128[bits], atol=1.5e-4)
    assert cb.mse == pytest.approx(BETA128_MSE[bits], abs=6e-5)
    # symmetric, sorted, thresholds are midpoints
    np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=1e-12)
    assert np.all(np.diff(cb.centroids) > 0)
    np.testing.assert_allclose(cb.thresholds, (cb.centroids[1:] + cb.centroids[:-1]) / 2)


def test_beta_law_approaches_gaussian_and_differs_at_small_d() -> None:
    g = lloyd_max(3, law="gaussian").centroids
    assert np.max(np.abs(lloyd_max(3, 8192, "beta").centroids - g)) < 2e-3
    assert np.max(np.abs(lloyd_max(3, 32, "beta").centroids - g)) > 3e-2  # small instances need the exact law


def test_distortion_sits_between_the_paper_bounds() -> None:
    for b in range(1, 6):
        mse = lloyd_max(b, 128).mse
        assert 4.0**-b < mse < (3**0.5 * np.pi / 2) * 4.0**-b


def test_bad_codebook_requests() -> None:
    with pytest.raises(InvalidInput, match="1..8"):
        lloyd_max(0, 128)
    with pytest.raises(InvalidInput, match=">= 3"):
        lloyd_max(2, 2, "beta")
    with pytest.raises(InvalidInput, match="law"):
        lloyd_max(2, 128, "laplace")


def test_bucket_equals_torch_bucketize_including_ties() -> None:
    import torch

    from kvslim.quant.codebooks import bucket

    thr = torch.tensor(lloyd_max(4, 64).thresholds, dtype=torch.float32)
    y = torch.randn(300, 64) * 2
    y[0, :15] = thr
    y[1, :2] = torch.tensor([0.0, -0.0])
    assert torch.equal(bucket(y, thr.tolist()), torch.bucketize(y, thr).to(torch.uint8))
    # float64 takes the PyTorch compare passes, float32 the compiled kernel where there is one: the same cells
    assert torch.equal(bucket(y.double(), thr.tolist()), torch.bucketize(y, thr).to(torch.uint8))


def test_additive_bias_is_torch_where_bit_for_bit() -> None:
    import torch

    from kvslim.cache.attend import additive_bias

    mask = torch.rand(3, 1, 7, 33) > 0.4
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        ref = torch.where(mask, 0.0, float("-inf")).to(dtype)
        got = additive_bias(mask, dtype)
        assert got.dtype == dtype and torch.equal(got, ref) and not torch.signbit(got[mask]).any()
