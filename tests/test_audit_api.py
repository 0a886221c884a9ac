"""The public API (audit.relink -> RelinkageResult): the documented example runs verbatim, and the
numbers equal a brute-force reference (scipy's hypergeometric on explicitly counted beaters)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hypergeom

from cxr_relink import audit
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_docs_example_runs_verbatim():
    text = (Path(ROOT) / "docs" / "audit.md").read_text()
    m = re.search(r"<!-- audit-api-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/audit.md lost its marked example"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 5
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/audit.md", "exec"), scope)
    res = scope["res"]
    assert isinstance(res, audit.RelinkageResult)
    assert "RecallAtN(" in out.getvalue() and "| image→report | 1 | 100 |" in out.getvalue()
    r = res.at(k=1, n=100)
    assert r.n == 100 and r.chance == pytest.approx(0.01) and r.ci[0] <= r.value <= r.ci[1]


def _data(m=240, d=12, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(m, d))
    rep = img + 1.5 * rng.normal(size=(m, d))
    patient = np.arange(m) // 3
    labels = np.where(rng.random((m, 14)) < 0.15, 1.0, np.nan)
    labels[:, 2:] = np.nan  # few label groups, so every group holds several patients
    return img, rep, patient, labels


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_at_n_equals_brute_force_hypergeometric():
    img, rep, patient, labels = _data()
    m = len(img)
    ks, ns = [1, 5], [10, 50]
    res = audit.relink(img, rep, patient_id=patient, labels=labels, ks=ks, ns=[*ns, "full"], n_boot=0)
    s = _unit(img) @ _unit(rep).T
    true = np.diag(s)
    beaten = (s > true[:, None]).sum(1)  # continuous data: no ties
    # image->report, random pools: mean_i P[Hypergeom(M-1, c_i, N-1) <= K-1]
    for k in ks:
        for n in ns:
            ref = hypergeom.cdf(k - 1, m - 1, beaten, n - 1).mean()
            got = res.recall[("i2t", k, n)]
            assert got.value == pytest.approx(ref, abs=1e-9) and got.chance == pytest.approx(k / n)
            assert got.x_chance == pytest.approx(ref / (k / n)) and got.ci is None
        assert res.at(k=k, n="full").value == pytest.approx((beaten <= k - 1).mean())
        assert res.at(k=k, n="full").n == m and res.at(k=k, n="full").full
    # report->image: the columns
    beaten_t = (s > true[None, :]).sum(0)
    assert res.recall[("t2i", 1, 10)].value == pytest.approx(hypergeom.cdf(0, m - 1, beaten_t, 9).mean(), abs=1e-9)
    # hard negatives: the population is the same (blank -> 0) label vector, less the patient's own studies
    lab = np.nan_to_num(labels)
    same = (lab[:, None, :] == lab[None, :, :]).all(2) & (patient[:, None] != patient[None, :])
    pop = same.sum(1)
    hb = ((s > true[:, None]) & same).sum(1)
    has = pop > 0
    for n in ns:
        draws = np.minimum(n - 1, pop[has])
        ref = hypergeom.cdf(0, pop[has], hb[has], draws).mean()
        got = res.recall[("hardneg/i2t", 1, n)]
        assert got.value == pytest.approx(ref, abs=1e-9)
        assert got.effective_pool == pytest.approx((draws + 1).mean())
        assert got.chance == pytest.approx((1 / (draws + 1)).mean())
    # every key's N is an int, and each row is the audit.json row it was built from
    assert all(isinstance(n, int) for (_, _, n) in res.recall)
    for row in res.sections["i2t"]["recall"]:
        assert res.recall[("i2t", row["k"], row["n_value"])].value == row["value"]


def test_studies_ci_and_errors():
    img, rep, patient, labels = _data(m=120)
    # two images per study: rows of a study repeat its report; the candidates are the studies
    study = np.arange(120) // 2
    rep_s = rep[study * 2]
    res = audit.relink(img, rep_s, patient_id=study // 2, study_id=study, ns=[10, "full"], n_boot=50)
    assert res.at(1, "full").n == 60 and res.sections["i2t"]["n_queries"] == 120
    r = res.at(1, 10)
    assert 0 <= r.ci[0] <= r.value <= r.ci[1] <= 1 and r.x_chance_ci[0] <= r.x_chance <= r.x_chance_ci[1]
    assert "hardneg/i2t" not in res.variants  # no labels: no hard negatives
    with pytest.raises(KeyError, match="N = 20"):
        res.at(1, 20)
    with pytest.raises(ValueError, match="needs labels"):
        audit.relink(img, rep, hardneg=True)
    with pytest.raises(TypeError, match="unknown settings"):
        audit.relink(img, rep, n_bootstrap=10)
    with pytest.raises(ValueError, match="rows"):
        audit.relink(img, rep[:-1])
