"""Privacy accounting: Opacus' accountants used explicitly, and an independent RDP computation.

* ``noise_multiplier_for`` finds sigma for (target epsilon, delta, q, steps) with Opacus' own
  binary search and a tight tolerance (the returned sigma always gives epsilon <= target).
* ``epsilon_kwargs``: PRV's epsilon is an *upper bound* within ``eps_error`` of its estimate;
  Opacus' default error 0.01 is 3% of epsilon = 0.34, and the sigma search then over-estimates sigma
  (spends less than the budget). The error is matched to the target: 1e-3 of epsilon.
* ``rdp_sampled_gaussian`` / ``epsilon_from_rdp`` are written from the formulas in the papers, not
  from Opacus' code, so that the tests can check Opacus' epsilon against them:
  - Mironov, Talwar, Zhang (2019), "Renyi Differential Privacy of the Sampled Gaussian
    Mechanism", Sec. 3.3: for integer alpha >= 2 the RDP of one step of the Poisson-subsampled
    Gaussian mechanism (rate q, noise multiplier sigma) is log(A_alpha) / (alpha - 1) with
        A_alpha = sum_{k=0..alpha} C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)).
  - RDP composes additively over steps; (alpha, R)-RDP implies (eps, delta)-DP with
        eps = R + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha - 1)
    (Balle et al. 2020, "Hypothesis testing interpretations and Renyi DP", Thm. 21), minimised
    over alpha; ``conversion="classic"`` gives Mironov (2017): eps = R + log(1/delta)/(alpha-1).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
INTEGER_ORDERS = tuple(range(2, 257))


def _logsumexp(xs: Iterable[float]) -> float:
    xs = list(xs)
    top = max(xs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in xs))


def rdp_sampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order alpha of one Poisson-subsampled Gaussian step (Mironov et al. 2019)."""
    if int(alpha) != alpha or alpha < 2:
        raise ValueError(f"integer orders >= 2 only, got {alpha}")
    alpha = int(alpha)
    if q == 0:
        return 0.0
    if q == 1:
        return alpha / (2 * sigma**2)
    terms = []
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        terms.append(log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2))
    return _logsumexp(terms) / (alpha - 1)


def epsilon_from_rdp(
    history: Sequence[tuple[float, float, int]],
    delta: float,
    orders: Sequence[int] = INTEGER_ORDERS,
    conversion: str = "balle2020",
) -> tuple[float, int]:
    """(epsilon, best order) for a history of (sigma, q, steps), composed in RDP."""
    if not history:
        return 0.0, orders[0]
    best = (math.inf, orders[0])
    for a in orders:
        r = sum(steps * rdp_sampled_gaussian(q, sigma, a) for sigma, q, steps in history)
        if conversion == "balle2020":
            eps = r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        elif conversion == "classic":
            eps = r + math.log(1 / delta) / (a - 1)
        else:
            raise ValueError(f"unknown conversion {conversion!r}")
        if eps < best[0]:
            best = (eps, a)
    return best


def noise_multiplier_for(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 1e-3,
) -> float:
    """Smallest sigma (to `epsilon_tolerance`) whose epsilon after `steps` is <= target."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
            **epsilon_kwargs(accountant, target_epsilon),
        )
    )


def epsilon_kwargs(accountant: str, target_epsilon: float) -> dict:
    """Extra arguments of ``accountant.get_epsilon``: PRV's error bound matched to the target."""
    return {"eps_error": 1e-3 * float(target_epsilon)} if accountant == "prv" else {}


def accountant_state(accountant) -> dict:
    """Checkpoint-safe state (plain lists/floats) of an Opacus accountant."""
    return {"mechanism": accountant.mechanism(), "history": [[float(s), float(q), int(n)] for s, q, n in accountant.history]}


def load_accountant_state(accountant, state: dict) -> None:
    if state["mechanism"] != accountant.mechanism():
        raise ValueError(
            f"checkpoint's privacy accountant is {state['mechanism']!r} but this run uses {accountant.mechanism()!r}; "
            "a resumed run must keep the same accountant to continue the same budget"
        )
    accountant.load_state_dict({"mechanism": state["mechanism"], "history": [(float(s), float(q), int(n)) for s, q, n in state["history"]]})


def default_delta(n_units: int) -> float:
    """delta = 1 / (10 N): an order of magnitude below 1/N (a mechanism that publishes one random
    record in full is (0, 1/N)-DP, so delta must be well below 1/N to mean anything)."""
    if n_units < 1:
        raise ValueError("cannot derive delta from an empty training set")
    return 1.0 / (10.0 * n_units)


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(k eps, k e^{(k-1) eps} delta): what (eps, delta)-DP per unit gives for k units together (e.g. a
    patient's k studies under study units; Dwork & Roth 2014, Thm 2.2 and its (eps, delta) form)."""
    if k < 1:
        raise ValueError(f"group privacy needs k >= 1 units, got {k}")
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta
