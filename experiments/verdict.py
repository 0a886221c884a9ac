"""The reproduction's verdict statistics (experiments/reproduce/render.py renders them into RESULTS.md).

Protocol (fixed before any run; RESULTS.md's header repeats it):

* **Per released model** (claims 2, 3, 4b: "this model links pairs above chance"): each trained run is
  one released model. Its evidence is the one-sided 95% lower bound of R@1 × chance from the audit's
  percentile bootstrap over patients (the 5th percentile, ``x_chance_ci90[0]`` in the audit JSON).
  The claim holds when *every* run's bound is above 1; it is contradicted when some run's one-sided
  95% upper bound is below 1. Audit JSONs made before ``x_chance_ci90`` existed only carry the
  two-sided 95% interval; their 2.5th percentile is used instead, a one-sided 97.5% (conservative) bound.
* **Recipe level and A > B** (claims 1, 4, the adaptive rows): seeds are the replicates (training
  randomness included). Work on log(× chance) (= log R@1 + const, so a ratio of R@1 at one N), pair
  by seed, one-sided 95% t-bounds of the mean log ratio, back-transformed to a geometric-mean ratio.
  A verdict needs at least ``MIN_SEEDS`` seeds; below that the rows show each seed and say "not
  decided". Every comparison states its smallest detectable effect: the ratio a one-sided t-test at
  this alpha would detect with 80% power, given the observed SD over seeds and the number of seeds.
* **"No drop" claims** (claim 4's AUROC, claim 5's robustness): non-inferiority, i.e. one side of a
  TOST, with a margin fixed here in advance: the one-sided 95% lower bound of the change must lie
  above -margin.
* **Ranges**: every interval is intersected with its parameter's range (R@1 in [0, 1], × chance in
  [0, N/K], AUROC in [0, 1]); over-seed intervals of positive quantities are computed on the log
  scale and back-transformed, so they cannot go below 0 in the first place. Intersecting an interval
  with the parameter space keeps its coverage (the true value is inside the range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

ALPHA = 0.05  # one-sided level of every test and bound
POWER = 0.80  # for the smallest detectable effect
MIN_SEEDS = 5  # recipe-level / A > B verdicts need at least this many seeds
AUROC_MARGIN = 0.01  # claim 4: DP may cost at most 1 macro-AUROC point (non-inferiority margin)
STYLE_MARGIN = 0.90  # claim 5: R@1 ratio (mixed / structured training) must stay above 0.90 (at most a 10% drop)
DP_CUT_MARGIN = 1.0  # claim 4: DP "cuts" re-linkage when the ratio after/before is below 1 (any cut)


def _t(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def mean_sd(xs: Sequence[float]) -> tuple[float, float | None]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def t_bounds(xs: Sequence[float], alpha: float = ALPHA) -> tuple[float, float | None, float | None]:
    """(mean, one-sided (1 - alpha) lower bound, one-sided (1 - alpha) upper bound) of the mean;
    together the bounds are the two-sided (1 - 2 alpha) t-interval. Bounds are None with < 2 values."""
    m, sd = mean_sd(xs)
    if sd is None:
        return m, None, None
    h = _t(1 - alpha, len(xs) - 1) * sd / math.sqrt(len(xs))
    return m, m - h, m + h


def smallest_detectable(sd: float | None, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The true mean shift d > 0 that a one-sided one-sample t-test at ``alpha`` detects with
    probability ``power`` given SD ``sd`` and ``n`` values (noncentral t, exact)."""
    if sd is None or n < 2:
        return None
    if sd == 0:
        return 0.0
    from scipy import optimize, stats

    df, crit = n - 1, _t(1 - alpha, n - 1)

    def gap(d: float) -> float:
        return float(stats.nct.sf(crit, df, d * math.sqrt(n) / sd)) - power

    hi = sd
    while gap(hi) < 0:
        hi *= 2
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-12 * sd))


def clip(x: float | None, low: float | None, high: float | None) -> float | None:
    if x is None:
        return None
    if low is not None:
        x = max(x, low)
    if high is not None:
        x = min(x, high)
    return x


@dataclass
class OverSeeds:
    """A quantity's value in each seed and its centre with a two-sided (1 - 2 alpha) interval over
    seeds: for positive quantities (``log=True``) the geometric mean and a log-scale t-interval
    back-transformed; always intersected with [low, high]."""

    values: list[float]
    center: float
    lo: float | None
    hi: float | None
    log: bool

    @property
    def n(self) -> int:
        return len(self.values)


def over_seeds(values: Sequence[float], low: float | None = 0.0, high: float | None = None, log: bool = True,
               alpha: float = ALPHA) -> OverSeeds | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if log and all(v > 0 for v in vals):
        m, lo, hi = t_bounds([math.log(v) for v in vals], alpha)
        m, lo, hi = math.exp(m), (None if lo is None else math.exp(lo)), (None if hi is None else math.exp(hi))
        # the geometric mean itself lies in the range already; clip the bounds only
    else:  # a zero (no re-linkage at all) has no log: the raw-scale t-interval, intersected with the range
        m, lo, hi = t_bounds(vals, alpha)
        log = False
    return OverSeeds(vals, m, clip(lo, low, high), clip(hi, low, high), log)


@dataclass
class Paired:
    """b against a, paired by seed, on log(b / a): per-seed ratios, the geometric-mean ratio and its
    one-sided (1 - alpha) bounds, the SD of the log ratios and the smallest detectable ratio."""

    seeds: list[int]
    ratios: list[float]
    ratio: float
    lb: float | None
    ub: float | None
    sd: float | None
    mde: float | None  # smallest detectable ratio above 1 (exp of the detectable log shift)
    dropped: list[int] = field(default_factory=list)  # seeds without both values (or a zero)

    @property
    def n(self) -> int:
        return len(self.ratios)


def paired_log_ratio(a: Sequence[float | None], b: Sequence[float | None], seeds: Sequence[int] | None = None,
                     alpha: float = ALPHA) -> Paired | None:
    seeds = list(seeds) if seeds is not None else list(range(len(a)))
    keep, dropped = [], []
    for s, x, y in zip(seeds, a, b):
        (keep if (x is not None and y is not None and x > 0 and y > 0) else dropped).append((s, x, y))
    if not keep:
        return None
    logs = [math.log(y / x) for _, x, y in keep]
    m, lo, hi = t_bounds(logs, alpha)
    _, sd = mean_sd(logs)
    d = smallest_detectable(sd, len(logs), alpha)
    return Paired([s for s, _, _ in keep], [math.exp(v) for v in logs], math.exp(m),
                  None if lo is None else math.exp(lo), None if hi is None else math.exp(hi), sd,
                  None if d is None else math.exp(d), [s for s, _, _ in dropped])


@dataclass
class PairedDiff:
    """b - a paired by seed on the raw scale (AUROC points): per-seed differences, mean, one-sided
    bounds, SD and the smallest detectable shift."""

    seeds: list[int]
    diffs: list[float]
    mean: float
    lb: float | None
    ub: float | None
    sd: float | None
    mde: float | None

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired_diff(a: Sequence[float | None], b: Sequence[float | None], seeds: Sequence[int] | None = None,
                alpha: float = ALPHA, low: float = -1.0, high: float = 1.0) -> PairedDiff | None:
    seeds = list(seeds) if seeds is not None else list(range(len(a)))
    keep = [(s, y - x) for s, x, y in zip(seeds, a, b) if x is not None and y is not None]
    if not keep:
        return None
    ds = [d for _, d in keep]
    m, lo, hi = t_bounds(ds, alpha)
    _, sd = mean_sd(ds)
    return PairedDiff([s for s, _ in keep], ds, m, clip(lo, low, high), clip(hi, low, high), sd,
                      smallest_detectable(sd, len(ds), alpha))


# ------------------------------------------------------------------ verdict words


def undecided(n: int, min_seeds: int = MIN_SEEDS) -> str | None:
    return f"not decided ({n} of the {min_seeds} seeds a verdict needs)" if n < min_seeds else None


def greater_verdict(p: Paired | None, min_seeds: int = MIN_SEEDS, threshold: float = 1.0) -> str:
    """b > a (ratio above ``threshold``): holds when the one-sided lower bound is above it,
    contradicted when the one-sided upper bound is below it."""
    if p is None:
        return "not available"
    if (u := undecided(p.n, min_seeds)):
        return u
    if p.lb is not None and p.lb > threshold:
        return "holds"
    if p.ub is not None and p.ub < threshold:
        return "contradicted"
    return "not shown (one-sided 95% bound includes no difference)"


def lower_verdict(p: Paired | None, min_seeds: int = MIN_SEEDS, threshold: float = 1.0) -> str:
    """b < a (ratio below ``threshold``)."""
    if p is None:
        return "not available"
    if (u := undecided(p.n, min_seeds)):
        return u
    if p.ub is not None and p.ub < threshold:
        return "holds"
    if p.lb is not None and p.lb > threshold:
        return "contradicted"
    return "not shown (one-sided 95% bound includes no difference)"


def noninferior_verdict(lb: float | None, ub: float | None, margin: float, n: int, min_seeds: int = MIN_SEEDS) -> str:
    """"No drop beyond the margin": holds when the one-sided lower bound is above ``margin``,
    contradicted when the one-sided upper bound is below it (a drop larger than the margin)."""
    if (u := undecided(n, min_seeds)):
        return u
    if lb is not None and lb > margin:
        return "holds"
    if ub is not None and ub < margin:
        return "contradicted"
    return "not shown (the one-sided 95% bound crosses the margin)"


def run_bound(row: dict | None, key: str = "x_chance", side: str = "lower") -> tuple[float | None, bool]:
    """One run's one-sided 95% bootstrap bound of ``key`` ("x_chance" or "value"), and whether it
    is exact (the audit's 5th/95th percentile) rather than the conservative 2.5th/97.5th percentile of
    an audit JSON made before ``*_ci90`` existed."""
    if not row:
        return None, False
    ci_key = "x_chance_ci" if key == "x_chance" else "ci"
    i = 0 if side == "lower" else 1
    if row.get(ci_key + "90"):
        return float(row[ci_key + "90"][i]), True
    if row.get(ci_key):
        return float(row[ci_key][i]), False
    return None, False


def per_run_verdict(lbs: Sequence[float | None], ubs: Sequence[float | None], threshold: float = 1.0) -> str:
    """Every released model above chance: each run's one-sided lower bound above ``threshold``."""
    lbs_ = [x for x in lbs if x is not None]
    if not lbs_:
        return "not available"
    if any(u is not None and u < threshold for u in ubs):
        return "contradicted (a run's one-sided 95% upper bound is below chance)"
    if len(lbs_) < len(lbs):
        return "not shown (a run has no bootstrap bound)"
    if all(x > threshold for x in lbs_):
        return "holds"
    return "not shown (a run's one-sided 95% lower bound is at or below chance)"
