"""Wilson intervals and the exact paired sign test against known values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvslim.eval.reports.stats import fmt_ci, paired, sign_test, wilson


@pytest.mark.parametrize("k,n,lo,hi", [  # Newcombe (1998), method 3, and the closed form by hand
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (8, 10, 0.4902, 0.9433),
    (1, 29, 0.0061, 0.1718),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_known_values(k, n, lo, hi):
    got = wilson(k / n, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


@given(n=st.integers(1, 500), data=st.data())
def test_wilson_contains_the_estimate_and_shrinks(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson(k / n, n)
    assert 0 <= lo <= k / n <= hi <= 1
    lo4, hi4 = wilson(k / n, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_format():
    assert fmt_ci(0.8, 10) == "0.80 [0.49, 0.94] n=10"
    assert wilson(0.5, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(1.5, 3)


@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),
    (3, 3, 1.0),
    (0, 5, 2 / 32),  # 2 * P(X = 0), X ~ Bin(5, 1/2)
    (1, 9, 2 * 11 / 1024),
    (10, 2, 2 * (1 + 12 + 66) / 4096),
    (0, 1, 1.0),
])
def test_sign_test_known_values(b, c, p):
    assert sign_test(b, c) == pytest.approx(p)
    assert sign_test(c, b) == pytest.approx(p)


def test_sign_test_matches_the_binomial_tail_sum():
    n = 30
    for k in range(n // 2):
        want = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        assert sign_test(k, n - k) == pytest.approx(want)


def test_paired_uses_only_shared_prompts_and_discordant_pairs():
    a = {("p", i): 1.0 for i in range(12)}
    b = {("p", i): (0.0 if i < 9 else 1.0) for i in range(10)}  # prompts 10, 11 only in A
    res = paired("full", "small", a, b)
    assert (res.n, res.a_better, res.b_better) == (10, 9, 0)
    assert res.p == pytest.approx(2 / 512) and res.differ
    assert res.mean_a == 1.0 and res.mean_b == pytest.approx(0.1)
    assert "full better on 9" in res.sentence() and "differ beyond chance" in res.sentence()
    same = paired("x", "y", {1: 1.0, 2: 0.0}, {1: 0.0, 2: 1.0})
    assert (same.a_better, same.b_better, same.p, same.differ) == (1, 1, 1.0, False)
