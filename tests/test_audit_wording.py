"""What a newcomer reads in the headline and report.md (issue #29): the hard-negative chance beside
its mean effective pool, explained; audit=all says why the adaptive attacker is not in it."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_relink.audit import result as R
from cxr_relink.audit.api import relink


def test_hardneg_headline_explains_chance_beside_the_mean_effective_pool() -> None:
    """A real audit whose label groups have unequal sizes: the headline's hard-negative chance is the
    mean over queries of 1/pool (checked against the row's own per-query definition: it exceeds
    1/(mean pool)), and the clause says so next to the number."""
    rng = np.random.default_rng(0)
    n = 120
    img = rng.normal(size=(n, 16))
    rep = img + 1.5 * rng.normal(size=(n, 16))
    labels = np.zeros((n, 14), dtype=np.float32)
    labels[:20, 0] = 1  # a small label group next to a large one: unequal pools
    res = R.build_result(relinkage=relink(img, rep, np.arange(n), labels, study_id=np.arange(n), n_boot=0,
                                          directions=["i2t"]).sections, meta={"split": "test"})
    row = next(r for r in res["relinkage"]["hardneg/i2t"]["recall"] if r["k"] == 1 and r["n"] == "100")
    pool = f"{row['effective_pool_mean']:.0f}"
    # an independent reference: the pools are the label groups (20 and 100 studies) -> chance
    # = mean over the 120 queries of 1/pool
    assert row["chance"] == pytest.approx((20 * (1 / 20) + 100 * (1 / 100)) / 120)
    assert row["chance"] > 1 / row["effective_pool_mean"]
    text = R.headline(res)
    assert (f"(mean effective pool {pool}; chance {100 * row['chance']:.2f}% is the mean of 1/pool over queries, "
            f"each ranked among its own label-matched candidates only, so small pools lift it above 1/{pool})") in text
    report = R.markdown_table(res)
    assert "chance per row: the mean over queries of K / (the query's own label-matched pool)" in report


def test_audit_all_says_why_the_adaptive_attacker_is_not_in_it(tmp_path) -> None:
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate
    from tests.test_audit_callbacks import _npz

    npz = _npz(tmp_path / "emb.npz")
    cfg = compose("evaluate.yaml", [f"embeddings={npz}", "audit=all", f"paths.output_dir={tmp_path / 'out'}",
                                    "audit.relinkage.n_boot=0", "audit.probe.n_boot=0"])
    evaluate(cfg)
    res = R.load_result(tmp_path / "out" / "audit.json")
    why = res["meta"]["skipped"]["adaptive"]
    assert why.startswith("not part of audit=all") and "audit=adaptive" in why
    assert f"adaptive skipped ({why})" in R.headline(res)
    assert f"adaptive: skipped: {why}" in (tmp_path / "out" / "report.md").read_text()
    # audit=adaptive itself still refuses an embeddings file (it needs the trunk), with that reason
    cfg = compose("evaluate.yaml", [f"embeddings={npz}", "audit=adaptive", f"paths.output_dir={tmp_path / 'o2'}"])
    with pytest.raises(ValueError, match="needs the model"):
        evaluate(cfg)
