"""One-run privacy audit (Steinke, Nasr & Jagielski 2023): p-value, epsilon bound, Gaussian checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from cxr_relink.audit.one_run import (
    audit_from_scores,
    default_k_grid,
    epsilon_lower_bound,
    gaussian_epsilon,
    guesses_from_scores,
    p_value,
    simulate_gaussian_canaries,
)

DELTA = 1e-5
# Noise scales whose exact epsilon at delta=1e-5 is about 1, 3 and 8 (checked in a test below).
SIGMA_FOR_EPS = {1.0: 3.7306, 3.0: 1.3906, 8.0: 0.6002}


def _pmf(r: int, q: float, k: int) -> float:
    return math.comb(r, k) * q**k * (1.0 - q) ** (r - k)


def _reference_p_value(m, r, v, eps, delta):
    """Written straight from the theorem: plain sums with math.comb, a Python loop over i."""
    q = math.exp(eps) / (1.0 + math.exp(eps))
    beta = sum(_pmf(r, q, k) for k in range(v, r + 1))
    alpha = 0.0
    for i in range(1, v + 1):
        window = sum(_pmf(r, q, k) for k in range(v - i, v))  # P[v - i <= Bin < v]
        alpha = max(alpha, window / i)
    return min(1.0, beta + 2.0 * m * delta * alpha)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [
        (100, 50, 30, 0.5, 0.0),
        (1000, 200, 150, 1.0, 0.0),
        (100, 50, 30, 0.5, 1e-3),
        (1000, 200, 150, 1.0, 1e-5),
        (10, 10, 10, 2.0, 1e-2),
        (60, 60, 45, 0.0, 1e-2),
        (1000, 100, 95, 3.0, 1e-5),
        (500, 40, 0, 1.0, 1e-4),  # v = 0: p = 1
        (1000, 10, 8, 0.1, 0.5),  # huge delta: clipped to 1
    ],
)
def test_p_value_matches_brute_force(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_reference_p_value(m, r, v, eps, delta), rel=1e-9)


def test_p_value_delta_term_is_not_negligible_in_a_case_that_tests_it():
    # Guard against the reference test passing with alpha silently dropped.
    assert p_value(100, 50, 30, 0.5, 1e-3) > p_value(100, 50, 30, 0.5, 0.0) * 1.01


@pytest.mark.parametrize(
    "args",
    [(10, 11, 5, 1.0, 0.0), (10, 5, 6, 1.0, 0.0), (10, 5, -1, 1.0, 0.0), (10, 5, 3, -0.1, 0.0),
     (10, 5, 3, 1.0, -1e-9), (10, 5, 3, 1.0, 1.5), (10, 5, 2.5, 1.0, 0.0), (10, 5, 3, float("nan"), 0.0)],
)
def test_p_value_validates(args):
    with pytest.raises(ValueError):
        p_value(*args)


@pytest.mark.parametrize("delta", [0.0, DELTA])
def test_bound_monotone_in_v_and_zero_below_half(delta):
    m, r = 1000, 200
    bounds = [epsilon_lower_bound(m, r, v, delta) for v in range(r + 1)]
    assert all(b == 0.0 for b in bounds[: r // 2 + 1])
    assert all(b1 >= b0 for b0, b1 in zip(bounds, bounds[1:]))
    assert bounds[-1] > 3.0  # and it does grow


@pytest.mark.parametrize("m, r, v, delta, conf", [(1000, 200, 150, DELTA, 0.95), (1000, 100, 100, 0.0, 0.99),
                                                  (50, 20, 14, 1e-3, 0.9), (1000, 200, 105, DELTA, 0.95)])
def test_bisection_brackets_the_threshold(m, r, v, delta, conf):
    tol, level = 1e-4, 1 - conf
    eps = epsilon_lower_bound(m, r, v, delta, confidence=conf, tol=tol)
    if eps == 0.0:
        assert p_value(m, r, v, 0.0, delta) >= level
    else:
        assert p_value(m, r, v, eps, delta) < level
        assert p_value(m, r, v, eps + 10 * tol, delta) >= level


@pytest.mark.parametrize("r", [10, 100, 1000])
@pytest.mark.parametrize("conf", [0.95, 0.99])
def test_all_correct_closed_form(r, conf):
    # delta = 0, v = r: the p-value is q^r, so the bound solves q^r = p.
    q = (1 - conf) ** (1.0 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(1000, r, r, 0.0, confidence=conf) == pytest.approx(expected, abs=1e-3)


def _hockey_stick_delta(eps, sigma):
    """delta(eps) = int max(0, p1 - e^eps p0) by quadrature, independent of the closed form."""
    p1, p0 = norm(1.0, sigma), norm(0.0, sigma)
    x0 = sigma**2 * eps + 0.5  # the integrand's kink
    val, _ = quad(lambda x: max(0.0, p1.pdf(x) - math.exp(eps) * p0.pdf(x)), x0, x0 + 40 * sigma,
                  epsabs=0, epsrel=1e-12, limit=200)
    return val


@pytest.mark.parametrize("sigma", [0.6, 1.0, 3.7306])
def test_gaussian_epsilon_reproduces_delta(sigma):
    eps = gaussian_epsilon(sigma, DELTA)
    c = 0.5 / sigma
    closed = norm.cdf(c - eps * sigma) - math.exp(eps) * norm.cdf(-c - eps * sigma)
    assert closed == pytest.approx(DELTA, rel=1e-9)
    assert _hockey_stick_delta(eps, sigma) == pytest.approx(DELTA, rel=1e-6)


def test_gaussian_epsilon_known_values_and_monotone():
    # Classical sufficient condition (Dwork & Roth, eps < 1): sigma = sqrt(2 ln(1.25/delta)) / eps.
    sigma = math.sqrt(2 * math.log(1.25 / DELTA)) / 0.5
    assert 0.3 < gaussian_epsilon(sigma, DELTA) < 0.5
    for target, s in SIGMA_FOR_EPS.items():
        assert gaussian_epsilon(s, DELTA) == pytest.approx(target, abs=0.01)
    eps = [gaussian_epsilon(s, DELTA) for s in (0.01, 0.3, 1.0, 3.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert eps[-1] < 0.05
    assert gaussian_epsilon(1000.0, 1e-2) == 0.0  # total variation < delta: no eps needed
    assert math.isfinite(eps[0]) and eps[0] > 1000  # log space: no overflow at tiny sigma


def test_guesses_tie_handling():
    assert guesses_from_scores([0.0, 0.0, 0.0, 0.0], 1, 1).tolist() == [1, 0, 0, -1]
    # Index 0 outranks index 4 (equal scores), so 4 is the one guessed OUT.
    assert guesses_from_scores([1.0, 3.0, 3.0, -2.0, 1.0], 2, 2).tolist() == [0, 1, 1, -1, -1]
    assert guesses_from_scores([1.0, 3.0, 3.0, -2.0, 1.0], 1, 1).tolist() == [0, 1, 0, -1, 0]
    assert guesses_from_scores([1.0, 2.0, 3.0], 0, 0).tolist() == [0, 0, 0]
    # Long runs of ties (where unstable sorts reorder): lowest indices IN, highest OUT.
    tied = guesses_from_scores(np.r_[np.zeros(500), np.ones(300), np.zeros(200)], 303, 3)
    assert np.flatnonzero(tied == 1).tolist() == [0, 1, 2] + list(range(500, 800))
    assert np.flatnonzero(tied == -1).tolist() == [997, 998, 999]
    with pytest.raises(ValueError):
        guesses_from_scores([1.0, 2.0], 2, 1)


@pytest.mark.parametrize("target_eps", [1.0, 3.0])
def test_audit_is_valid_on_gaussian_mechanism(target_eps):
    # At confidence 0.99 each run exceeds the true eps w.p. <= 0.01, so over 20 runs we expect
    # <= 0.2 exceedances and P[>= 2] <= C(20,2) 0.01^2 < 0.02; the seeds make it deterministic.
    sigma = SIGMA_FOR_EPS[target_eps]
    true_eps = gaussian_epsilon(sigma, DELTA)
    bounds = []
    for seed in range(20):
        scores, included = simulate_gaussian_canaries(1000, sigma, np.random.default_rng(seed))
        bounds.append(audit_from_scores(scores, included, DELTA, confidence=0.99)["epsilon_lower_bound"])
    assert sum(b > true_eps for b in bounds) <= 1
    assert np.median(bounds) > 0.0  # the audit sees something, so the check is not vacuous


def test_audit_power_on_leaky_gaussian():
    sigma = SIGMA_FOR_EPS[8.0]
    for seed in range(3):
        scores, included = simulate_gaussian_canaries(1000, sigma, np.random.default_rng(100 + seed))
        assert audit_from_scores(scores, included, DELTA)["epsilon_lower_bound"] > 1.5


@pytest.mark.parametrize("delta", [0.0, DELTA])
def test_audit_near_perfect_mechanism_hits_closed_form(delta):
    # sigma = 0.01 separates in from out perfectly, so every grid point with 2k <= min(#in, #out)
    # is all-correct; the largest such r must reach the all-correct closed form at level p/family.
    scores, included = simulate_gaussian_canaries(1000, 0.01, np.random.default_rng(7))
    out = audit_from_scores(scores, included, delta, confidence=0.95)
    perfect = [row for row in out["grid"] if 2 * row["k_pos"] <= min(included.sum(), (~included).sum())]
    assert perfect and all(row["v"] == row["r"] for row in perfect)
    row = max(perfect, key=lambda row: row["r"])
    q = (0.05 / out["family_size"]) ** (1.0 / row["r"])
    closed = math.log(q / (1 - q))
    assert row["epsilon_lower_bound"] <= closed + 1e-3
    # With delta > 0 the alpha term (2 m delta = 0.02 here) costs a little: about 0.07 at r = 400.
    assert row["epsilon_lower_bound"] == pytest.approx(closed, abs=1e-3 if delta == 0 else 0.1)
    assert out["epsilon_lower_bound"] >= row["epsilon_lower_bound"] > 4.0


def test_audit_family_size_grid_and_json():
    rng = np.random.default_rng(3)
    scores, included = simulate_gaussian_canaries(1000, 1.0, rng)
    named = {"a": scores, "b": -scores}
    out = audit_from_scores(named, included, DELTA, confidence=0.95)
    grid = default_k_grid(1000)
    assert [k for k, _ in grid] == [10, 20, 50, 100, 200, 500]
    assert out["family_size"] == 2 * len(grid) == len(out["grid"])
    assert out["m"] == 1000 and out["n_included"] == int(included.sum())
    # Each grid point is tested at the Bonferroni level p / family_size.
    for row in out["grid"]:
        assert row["epsilon_lower_bound"] == epsilon_lower_bound(
            1000, row["r"], row["v"], DELTA, confidence=1 - 0.05 / out["family_size"])
    assert out["epsilon_lower_bound"] == max(row["epsilon_lower_bound"] for row in out["grid"])
    assert out["best"]["scores"] == "a"  # the reversed scores are worse than chance
    json.dumps(out)
    assert [k for k, _ in default_k_grid(30)] == [1, 2, 3, 6, 15]
    custom = audit_from_scores(scores, included, DELTA, k_grid=[5, (10, 0)])
    assert custom["family_size"] == 2 and custom["grid"][1]["r"] == 10


def test_audit_without_information_gives_no_bound():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        out = audit_from_scores(rng.normal(size=1000), included, DELTA)
        assert out["epsilon_lower_bound"] < 0.1
