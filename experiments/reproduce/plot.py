"""The figure beside RESULTS.md, from the same run records (records.py) as the tables."""

from __future__ import annotations

from pathlib import Path

from experiments import verdict as V
from experiments.reproduce.plan import BEFORE_DP, DP_ARMS, READINGS, TOWERS
from experiments.reproduce.records import Records, pool_sizes, probe_row, rows_of, values, x_high


def plot(rec: Records, path: Path) -> None:
    """RESULTS_claims.png: claims 1–2 (× chance by pool size) and claim 4 (paired R@1 ratios, AUROC drops)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]  # claims 1-2: × chance on a log axis, each seed a point, the geometric mean a line
    for i, (key, title) in enumerate(TOWERS):
        res = rec.results(key)
        ns = pool_sizes(next((r for r in res if r), None))
        xs, gm = [], []
        for n_ in ns:
            rows = [r for r in rows_of(res, n=n_) if r]
            if not rows:
                continue
            nv = rows[0]["n_value"]
            ax.scatter([nv * (1 + 0.04 * (i - 1))] * len(rows), [r["x_chance"] for r in rows], s=14, color=f"C{i}", alpha=0.7)
            o = V.over_seeds([r["x_chance"] for r in rows], 0.0, x_high(rows))
            xs.append(nv * (1 + 0.04 * (i - 1)))
            gm.append(o.center)
        if xs:
            ax.plot(xs, gm, color=f"C{i}", label=f"{title} (geometric mean; dots: seeds)")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidate pool N (largest = full test DB)")
    ax.set_ylabel("image→report R@1 × chance (log)")
    ax.set_title("claims 1–2", fontsize=10)
    ax.legend(fontsize=7)
    # Claim 4, paired as the analysis is: each seed's DP/before and DP/control ratio of R@1 (a line joins a
    # seed's two comparisons), the geometric mean with its one-sided 95% upper bound, and "no cut" at 1; the
    # AUROC drop (matched probe) per seed, its mean with the one-sided 95% upper bound, and the 1-point margin.
    n4 = rec.dp_n()
    bd = BEFORE_DP[0]
    auroc = {t: [None if r is None else (probe_row(r) or {}).get("value") for r in rec.results(t)]
             for t in (bd, *[t for t, *_ in DP_ARMS])}
    ticks = []
    for k, (label, title, dp, ctrl, _, before) in enumerate(READINGS):
        b, d, c = (values(rows_of(rec.results(t), n=n4)) for t in (before, dp, ctrl))
        for j, (what, p, x) in enumerate((("before", V.paired_log_ratio(b, d, rec.seeds), None),
                                          ("control", V.paired_log_ratio(c, d, rec.seeds), None))):
            pos = 3 * k + j
            ticks.append((pos, f"{label}: DP /\n{what}"))
            if p:
                axes[1].scatter([pos] * p.n, p.ratios, s=14, color="C0", alpha=0.7)
                axes[1].plot([pos - 0.3, pos + 0.3], [p.ratio] * 2, color="k", lw=1.5)
                if p.ub is not None:
                    axes[1].plot([pos, pos], [p.ratio, p.ub], color="k", lw=1)
                    axes[1].plot([pos - 0.12, pos + 0.12], [p.ub] * 2, color="k", lw=1)
        for j, (what, ref) in enumerate((("before", bd), ("control", ctrl))):
            x = V.paired_diff(auroc[ref], auroc[dp], rec.seeds)
            pos = 3 * k + j
            if x:
                drops = [100 * (0.0 - v) for v in x.diffs]
                axes[2].scatter([pos] * x.n, drops, s=14, color="C1", alpha=0.7)
                axes[2].plot([pos - 0.3, pos + 0.3], [0.0 - 100 * x.mean] * 2, color="k", lw=1.5)
                if x.lb is not None:
                    up = 0.0 - 100 * x.lb
                    axes[2].plot([pos, pos], [0.0 - 100 * x.mean, up], color="k", lw=1)
                    axes[2].plot([pos - 0.12, pos + 0.12], [up] * 2, color="k", lw=1)
    for ax in axes[1:]:
        ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=6)
    axes[1].axhline(1.0, color="k", ls="--", lw=1, label="no cut (ratio 1)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"R@1 ratio at N = {n4} (log)")
    axes[1].set_title(f"claim 4 (ε = {rec.epsilon} per unit; 4p: patient units): paired R@1 ratios\n(dots: seeds, "
                      "bar: geometric mean, whisker: one-sided 95% upper bound)", fontsize=8)
    axes[1].legend(fontsize=7)
    axes[2].axhline(100 * V.AUROC_MARGIN, color="C3", ls="--", lw=1,
                    label=f"non-inferiority margin ({100 * V.AUROC_MARGIN:.0f} point)")
    axes[2].axhline(0.0, color="k", lw=0.5)
    axes[2].set_ylabel("macro AUROC drop (points; matched probe)")
    axes[2].set_title("claim 4: AUROC drop, probe fitted on the public cohort for every arm\n(dots: seeds, bar: mean, "
                      "whisker: one-sided 95% upper bound)", fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
