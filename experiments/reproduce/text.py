"""Text of RESULTS.md's cells and verdict sentences: numbers with their intervals and bounds, paired ratios and
drops, and how a claim of several parts is decided (the statistics themselves: experiments/verdict.py)."""

from __future__ import annotations

from pathlib import Path

from cxr_relink.configs import ROOT
from experiments import verdict as V


def seeds_cell(o: V.OverSeeds | None, scale: float = 1.0, digits: int = 2) -> str:
    """Centre over seeds and its interval (inside the parameter's range; see verdict.over_seeds)."""
    if o is None:
        return "–"
    c = f"{scale * o.center:.{digits}f}"
    if o.lo is None:
        return c + " (one seed)"
    return f"{c} [{scale * o.lo:.{digits}f}, {scale * o.hi:.{digits}f}]"


def run_cell(row: dict | None, key: str = "x_chance", scale: float = 1.0, digits: int = 2) -> str:
    """One run: value and its one-sided 95% bootstrap lower bound (* = conservative 97.5% bound of an
    older audit JSON)."""
    if not row or row.get(key) is None:
        return "–"
    lb, exact = V.run_bound(row, key)
    return f"{scale * row[key]:.{digits}f}" + ("" if lb is None else f" (≥ {scale * lb:.{digits}f}{'' if exact else '*'})")


def ratio_text(p: V.Paired | None, what: str = "ratio") -> str:
    if p is None:
        return "no seed has both values"
    per = ", ".join(f"s{s} {r:.3f}" for s, r in zip(p.seeds, p.ratios))
    t = f"{what} {p.ratio:.3f} (geometric mean over {p.n} seed{'s' if p.n != 1 else ''}: {per})"
    if p.lb is not None and not p.sd:
        # Every seed gives the same ratio: no sampling spread to test against (a fact of the runs, e.g. of
        # construction); a t-bound and a "detects beyond x1.000" would only restate it.
        t += "; the same on every seed (no spread over seeds: nothing to test)"
    elif p.lb is not None:
        t += (f"; one-sided 95% bounds ≥ {p.lb:.3f} and ≤ {p.ub:.3f}; SD of the log ratio over seeds {p.sd:.3f}, "
              f"so {p.n} seeds detect (80% power) a ratio beyond ×{p.mde:.3f} or below ×{1 / p.mde:.3f}")
    if p.dropped:
        t += f"; seeds without both values: {p.dropped}"
    return t


def drop_text(d: V.PairedDiff | None, margin: float, scale: float = 100.0, unit: str = "points") -> str:
    """A "no drop beyond the margin" comparison, stated as the question is one-sided: the drop
    (before − after, paired by seed) and its one-sided 95% upper bound against the margin."""
    if d is None:
        return "no seed has both values"
    # (0.0 - x: a zero drop prints as 0.00, not -0.00)
    per = ", ".join(f"s{s} {0.0 - scale * x:.2f}" for s, x in zip(d.seeds, d.diffs))
    t = f"drop {0.0 - scale * d.mean:.2f} {unit} (mean over {d.n} seed{'s' if d.n != 1 else ''}: {per})"
    if d.lb is not None:
        t += (f"; one-sided 95% upper bound of the drop {0.0 - scale * d.lb:.2f} {unit} (margin {scale * margin:.0f}); "
              f"SD {scale * d.sd:.2f}, smallest detectable shift (80% power) {scale * d.mde:.2f} {unit}")
    return t


def combine(*verdicts: str) -> str:
    """A claim made of parts holds when every part holds; otherwise it takes the first part that is not
    available, contradicted, not decided or not shown, in that order."""
    for word in ("not available", "contradicted", "not decided", "not shown"):
        for v in verdicts:
            if v.startswith(word):
                return v
    return "holds"


def per_patient_cell(recs: list[dict]) -> str:
    """The per-patient reading of a table row's DP records: "= the unit" for patient units; for study units the
    group-privacy (eps, delta) of the worst seed where its delta is below 1/#patients (records before issue #28
    carry no `meaningful` flag: the same rule, with the public bound on N for #patients), else none."""
    if all(r.get("privacy_unit") == "patient" for r in recs):
        return "= per unit"
    pps = [r.get("per_patient") for r in recs]
    if any(pp is None for pp in pps):
        return "not stated"

    def meaningful(r: dict) -> bool:
        pp = r["per_patient"]
        if "meaningful" in pp:
            return bool(pp["meaningful"])
        bound = r.get("n_train_units") or r.get("n_train_units_upper")
        return pp["delta"] < 1 and (not bound or pp["delta"] < 1.0 / bound)

    worst = max(recs, key=lambda r: r["per_patient"]["delta"])
    if not all(meaningful(r) for r in recs):
        return f"none meaningful (k = {worst['per_patient']['k']}: δ {worst['per_patient']['delta']:.2g} ≥ 1/#patients)"
    pp = worst["per_patient"]
    return f"ε {pp['epsilon']:.2f}, δ {pp['delta']:.1e} (k = {pp['k']})"


def rel_path(p: Path | None) -> str:
    """A path as RESULTS.md names it: relative to the repository where it lies inside it."""
    if p is None:
        return "–"
    p = p.resolve()
    return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
