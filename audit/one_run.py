"""Empirical lower bound on epsilon from one training run (Steinke, Nasr & Jagielski, arXiv 2305.08846).

Setting: m canaries, each included in training independently with probability 1/2 (S_i = +1 in,
-1 out). After the run the auditor guesses T_i in {-1, 0 (abstain), +1} for each canary from the
released output only; r = number of non-abstaining guesses (fixed before looking at the outcome),
v = number of correct ones. The paper's main theorem with delta (its Appendix D algorithm): if the
mechanism is (eps, delta)-DP with respect to each canary, then for the count W of correct guesses

    P[W >= v] <= beta + alpha,   beta  = P[Binomial(r, q) >= v],   q = e^eps / (1 + e^eps),
                                 alpha = 2 m delta * max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i.

So min(1, beta + alpha) is a p-value for the null "the mechanism is (eps, delta)-DP" and every eps
it rejects at level p is excluded. ``epsilon_lower_bound`` returns the largest such eps.

Meaning of the result: it is a *lower* bound on the mechanism's true epsilon (at that delta) that
holds with the stated confidence. For a mechanism that really is (eps, delta)-DP, the reported bound
exceeds eps with probability at most p = 1 - confidence; a bound far above the claimed epsilon is
therefore evidence of a bug or a wrong analysis, while a small bound proves nothing (one-run audits
are loose unless the canaries are very easy to detect).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.special import expit
from scipy.stats import binom, norm

__all__ = [
    "p_value",
    "epsilon_lower_bound",
    "guesses_from_scores",
    "audit_from_scores",
    "default_k_grid",
    "simulate_gaussian_canaries",
    "gaussian_epsilon",
]

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50)


def _check_counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if isinstance(x, bool) or int(x) != x:
            raise ValueError(f"{name} must be an integer, got {x!r}")
    m, r, v = int(m), int(r), int(v)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    return m, r, v


def _check_delta(delta: float) -> float:
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1], got {delta!r}")
    return float(delta)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of >= v correct out of r guesses (m canaries) under the null "(eps, delta)-DP"."""
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    q = float(expit(eps))  # e^eps / (1 + e^eps) without overflow for large eps
    beta = float(binom.sf(v - 1, r, q))  # P[Bin >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, beta)
    # P[v - i <= Bin < v] for i = 1..v is the running sum of pmf(v-1), pmf(v-2), ..., pmf(v-i);
    # summing pmf terms avoids the cancellation of cdf(v-1) - cdf(v-i-1). (i > v adds nothing:
    # the probability stays at P[Bin < v] while i grows, so max over i in 1..m = max over 1..v.)
    window = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = 2.0 * m * delta * float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, beta + alpha)


def epsilon_lower_bound(
    m: int,
    r: int,
    v: int,
    delta: float,
    confidence: float = 0.95,
    eps_max: float = 50.0,
    tol: float = 1e-4,
) -> float:
    """Largest eps (to within tol, found by bisection) whose p-value is still < 1 - confidence.

    Returns 0.0 if even eps = 0 is not rejected and eps_max if eps_max is still rejected. The
    returned value is always on the rejected side (its p-value is < p), so rounding errs low.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if not (eps_max > 0 and tol > 0):
        raise ValueError("eps_max and tol must be positive")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    if p_value(m, r, v, eps_max, delta) < level:
        return float(eps_max)
    lo, hi = 0.0, float(eps_max)  # invariant: p(lo) < level <= p(hi)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores, k_pos: int, k_neg: int) -> np.ndarray:
    """Guess +1 for the k_pos highest scores, -1 for the k_neg lowest, 0 (abstain) for the rest.

    Ties are broken deterministically by a stable sort on -score: among equal scores the lower
    index ranks higher, so it is guessed IN first and guessed OUT last. Returns an int8 array.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    k_pos, k_neg = int(k_pos), int(k_neg)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m={s.size}")
    order = np.argsort(-s, kind="stable")  # descending, ties by index
    guesses = np.zeros(s.size, dtype=np.int8)
    guesses[order[:k_pos]] = 1
    if k_neg:
        guesses[order[s.size - k_neg:]] = -1
    return guesses


def default_k_grid(m: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[tuple[int, int]]:
    """(k, k) for k = round(f * m) over the fractions, clipped to [1, m // 2], deduplicated."""
    if m < 2:
        raise ValueError("need at least 2 canaries")
    ks = sorted({min(max(1, int(round(f * m))), m // 2) for f in fractions})
    return [(k, k) for k in ks]


def audit_from_scores(
    scores,
    included,
    delta: float,
    confidence: float = 0.95,
    k_grid: Sequence | None = None,
) -> dict:
    """One-run audit over a fixed grid of guess counts, Bonferroni-corrected.

    scores: 1-D array (higher = more likely included) or a dict name -> such arrays; included:
    bool array, the truth. k_grid: ints k (meaning k_pos = k_neg = k) or (k_pos, k_neg) pairs;
    default ``default_k_grid(m)``. Picking the best grid point after seeing the outcome would void
    the confidence, so every (score array, grid point) pair is tested at level p / family_size with
    family_size = n_score_arrays * len(k_grid); by the union bound the reported maximum then
    exceeds the true epsilon with probability at most p = 1 - confidence.
    """
    truth = np.asarray(included)
    if truth.ndim != 1 or truth.dtype != bool:
        raise ValueError("included must be a 1-D bool array")
    m = truth.size
    named = dict(scores) if isinstance(scores, Mapping) else {"scores": scores}
    if not named:
        raise ValueError("no score arrays given")
    for name, s in named.items():
        if np.shape(s) != (m,):
            raise ValueError(f"scores {name!r} has shape {np.shape(s)}, expected ({m},)")
    if k_grid is None:
        grid = default_k_grid(m)
    else:
        grid = [(int(k), int(k)) if np.isscalar(k) else (int(k[0]), int(k[1])) for k in k_grid]
        if not grid:
            raise ValueError("k_grid is empty")
    delta = _check_delta(delta)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    family_size = len(named) * len(grid)
    per_test_confidence = 1.0 - (1.0 - confidence) / family_size

    sign = np.where(truth, 1, -1)
    rows = []
    for name, s in named.items():
        for k_pos, k_neg in grid:
            guesses = guesses_from_scores(s, k_pos, k_neg)
            r = k_pos + k_neg
            v = int(np.sum(guesses == sign))  # abstentions (0) never match +-1
            bound = epsilon_lower_bound(m, r, v, delta, confidence=per_test_confidence)
            rows.append({"scores": name, "k_pos": k_pos, "k_neg": k_neg, "r": r, "v": v,
                         "epsilon_lower_bound": bound})
    best = max(rows, key=lambda row: row["epsilon_lower_bound"])  # first of equals
    return {
        "m": int(m),
        "n_included": int(truth.sum()),
        "delta": delta,
        "confidence": float(confidence),
        "family_size": int(family_size),
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "best": dict(best),
        "grid": rows,
    }


def simulate_gaussian_canaries(m: int, sigma: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mechanism on m independent canaries: y_i = 1{included_i} + N(0, sigma^2).

    Each canary touches only its own coordinate with sensitivity 1, so the release is exactly as
    private w.r.t. each canary as the one-dimensional Gaussian mechanism (``gaussian_epsilon``).
    rng: a numpy Generator (or a seed). Returns (scores, included).
    """
    rng = np.random.default_rng(rng)
    included = rng.random(m) < 0.5
    scores = included.astype(float) + rng.normal(0.0, sigma, size=m)
    return scores, included


def _gaussian_delta(eps: float, sigma: float) -> float:
    """Balle & Wang (2018) privacy profile of the sensitivity-1 Gaussian mechanism."""
    c = 0.5 / sigma
    # e^eps * Phi(.) in log space: e^eps overflows long before the product does.
    return float(norm.cdf(c - eps * sigma) - math.exp(eps + norm.logcdf(-c - eps * sigma)))


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon at delta of the Gaussian mechanism (sensitivity 1, noise sigma), by bisection.

    delta(eps) is strictly decreasing in eps, so bisection on it is exact up to float precision.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must lie in (0, 1], got {delta!r}")
    if _gaussian_delta(0.0, sigma) <= delta:
        return 0.0
    hi = 1.0
    while _gaussian_delta(hi, sigma) > delta:
        hi *= 2.0
    lo = 0.0  # invariant: delta(lo) > delta >= delta(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # float resolution reached
            break
        if _gaussian_delta(mid, sigma) > delta:
            lo = mid
        else:
            hi = mid
    return hi  # the side that satisfies delta(eps) <= delta
