"""recall_vs_n.png read back through matplotlib's objects (issue #29, "Plots"): the legend covers no
data point, a CI whose lower bound is 0 is not drawn as a wedge down to an invented 0.01×, and every
panel (the hard-negative one with effective pools of 45 and 66 included) has x tick labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from cxr_relink.audit import result as R  # noqa: E402


def _row(k, n, nv, x, ci, pool=None, chance=None):
    ch = chance or k / nv
    return {"k": k, "n": n, "n_value": nv, "value": x * ch, "chance": ch, "x_chance": x, "x_chance_ci": list(ci),
            "ci": [ci[0] * ch, ci[1] * ch], "effective_pool_mean": pool or nv,
            "frac_queries_pool_below_n": 0.0 if pool is None else 1.0}


def _section(rows, variant="plain"):
    return {"direction": "i2t", "variant": variant, "n_queries": 500, "n_candidates": 1200, "ties_policy": "pessimistic",
            "ties": {"n_queries_with_ties": 0}, "rank": {"mrr": 0.2, "median_rank": 9}, "recall": rows,
            "clipped_n": [10000], "label_mapping": "blank_negative", "n_label_groups": 3, "population_median": 40,
            "n_queries_no_negatives": 0}


# image->report falling with N (the N = 100 points are the panel's top left, where the legend was);
# at the full database the K = 1 CI reaches 0. Hard negatives at mean effective pools of 45 and 66.
I2T = [_row(1, "100", 100, 50.0, [40.0, 60.0]), _row(5, "100", 100, 15.0, [12.0, 18.0]),
       _row(1, "1000", 1000, 20.0, [10.0, 30.0]), _row(5, "1000", 1000, 12.0, [8.0, 16.0]),
       _row(1, "full", 1200, 12.0, [0.0, 36.0]), _row(5, "full", 1200, 9.0, [3.0, 15.0])]
HARD = [_row(1, "100", 100, 1.66, [1.45, 1.89], pool=45, chance=0.1469), _row(5, "100", 100, 1.2, [1.1, 1.3], pool=45, chance=0.5),
        _row(1, "full", 1200, 1.67, [1.45, 1.89], pool=66, chance=0.1456), _row(5, "full", 1200, 1.21, [1.1, 1.32], pool=66, chance=0.48)]


@pytest.fixture
def fig():
    res = R.build_result(relinkage={"i2t": _section(I2T), "hardneg/i2t": _section(HARD, "hardneg")},
                         meta={"split": "test", "model": "M"})
    f = R.plot_recall_vs_n(res)
    f.canvas.draw()
    yield f
    plt.close(f)


def _points(ax):
    """Display coordinates of every data marker of a panel."""
    out = []
    for line in ax.get_lines():
        if line.get_marker() in (None, "None", "", " "):
            continue
        xy = np.column_stack(line.get_data()).astype(float)
        out += list(ax.transData.transform(xy)) if len(xy) else []
    return out


def test_legend_covers_no_data_point(fig) -> None:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "the figure has a legend"
    renderer = fig.canvas.get_renderer()
    boxes = [lg.get_window_extent(renderer) for lg in legends]
    for ax in fig.axes:
        pts = _points(ax)
        assert pts
        hidden = [p for p in pts for b in boxes if b.contains(*p)]
        assert not hidden, f"{ax.get_title()}: the legend covers data points at {hidden}"
    # every curve is named in it: K=1, K=5 and chance
    labels = {t.get_text() for lg in legends for t in lg.get_texts()}
    assert {"K=1", "K=5", "chance (1×)"} <= labels


def test_ci_reaching_zero_is_no_wedge_to_a_made_up_floor(fig) -> None:
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    positive = [v for r in I2T for v in (r["x_chance"], *r["x_chance_ci"]) if v > 0]
    # the panel spans the data (and 1×), not down to 0.01×
    assert min(positive + [1.0]) / 2 < lo < min(positive + [1.0])
    # no band polygon has a vertex inside the panel below the smallest positive lower CI bound: the
    # zero-lower row is not joined to its neighbours by an interpolated band
    low = min(v for r in I2T for v in r["x_chance_ci"][:1] if v > 0)
    for coll in ax.collections:
        if isinstance(coll, PolyCollection):
            for path in coll.get_paths():
                ys = path.vertices[:, 1]
                assert not np.any((ys >= lo) & (ys < low * (1 - 1e-9))), "a band reaches below the positive CIs"
    # the zero-lower bound is marked on the bottom edge at its pool size
    marks = [line for line in ax.get_lines() if line.get_marker() == "v" and len(line.get_xdata())]
    assert any(float(x) == 1200 and float(y) == pytest.approx(lo) for m in marks for x, y in zip(*m.get_data()))


@pytest.mark.parametrize("panel", [0, 1])
def test_every_panel_has_x_tick_labels(fig, panel) -> None:
    ax = fig.axes[panel]
    lo, hi = ax.get_xlim()
    shown = []
    for ticks, locs in ((ax.xaxis.get_major_ticks(), ax.xaxis.get_majorticklocs()),
                        (ax.xaxis.get_minor_ticks(), ax.xaxis.get_minorticklocs())):
        shown += [t.label1.get_text() for t, v in zip(ticks, locs) if lo <= v <= hi and t.label1.get_visible()
                  and t.label1.get_text()]
    assert len(shown) >= 2, f"{ax.get_title()}: x tick labels {shown}"
    if panel == 1:  # the hard-negative panel: plain numbers between 45 and 66
        assert all(40 <= float(s) <= 70 for s in shown)


def test_ci_of_rows_at_one_pool_size_is_drawn() -> None:
    """Hard negatives whose label groups are smaller than every N sit at one effective pool: their CI
    (a zero-width band before) is a vertical bar from the lower to the upper bound."""
    rows = [_row(1, n, nv, 2.45, [2.32, 2.61], pool=10.9, chance=0.24) for n, nv in (("100", 100), ("full", 1200))]
    res = R.build_result(relinkage={"hardneg/i2t": _section(rows, "hardneg")}, meta={"split": "test"})
    f = R.plot_recall_vs_n(res)
    ax = f.axes[0]
    bars = [tuple(np.round(line.get_ydata(), 6)) for line in ax.get_lines()
            if len(line.get_xdata()) == 2 and len(set(line.get_xdata())) == 1]
    plt.close(f)
    assert (2.32, 2.61) in bars


def test_title_fits_the_figure() -> None:
    """A checkpoint's long description (the default run's) is wrapped: every title line lies inside the figure
    (it used to be cut at both edges)."""
    meta = {"source": "checkpoint", "split": "test", "model": "DualTowerModule", "checkpoint": "/runs/x/epoch_000.ckpt",
            "epoch": 0, "checkpoint_selection": "lowest val/loss on the val split"}
    res = R.build_result(relinkage={"i2t": _section(I2T), "hardneg/i2t": _section(HARD, "hardneg")}, meta=meta)
    f = R.plot_recall_vs_n(res)
    f.canvas.draw()
    box = f._suptitle.get_window_extent(renderer=f.canvas.get_renderer())
    width = f.get_size_inches()[0] * f.dpi
    assert len(f._suptitle.get_text()) > 100 and 0 <= box.x0 and box.x1 <= width
    plt.close(f)
