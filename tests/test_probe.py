"""Linear probe against scikit-learn: AUROC on the same scores, label policies, skips, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_relink.audit.probe import apply_label_policy, linear_probe
from cxr_relink.datamodules.records import CHEXPERT_LABELS


def _data(seed=0, n_train=300, n_test=200, dim=12):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, 14))

    def make(n):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        p = 1 / (1 + np.exp(-(x @ w)))
        y = (rng.random((n, 14)) < p).astype(np.float32)
        y[rng.random((n, 14)) < 0.1] = -1.0
        y[rng.random((n, 14)) < 0.1] = np.nan
        return x, y

    return make(n_train), make(n_test)


def test_probe_auroc_equals_sklearn_on_same_scores():
    (xtr, ytr), (xte, yte) = _data()
    yte[:, 5] = np.where(np.isnan(yte[:, 5]), np.nan, 0.0)  # one class only in test -> skipped
    res = linear_probe(xtr, ytr, xte, yte, test_patient=np.arange(len(xte)) // 2, n_boot=50, return_scores=True,
                       uncertain="ignore", blank="ignore")
    scores = res["scores"].numpy()
    name5 = CHEXPERT_LABELS[5]
    assert name5 in res["skipped"] and "single class in test" in res["skipped"][name5]
    refs = []
    for j, name in enumerate(CHEXPERT_LABELS):
        if name in res["skipped"]:
            continue
        valid = ~np.isnan(yte[:, j]) & (yte[:, j] != -1)  # "ignore" policy
        ref = roc_auc_score(yte[valid, j], scores[valid, j])
        assert res["per_label"][name]["auroc"] == pytest.approx(ref, abs=1e-6)
        refs.append(ref)
    assert res["macro_auroc"] == pytest.approx(np.mean(refs), abs=1e-6)
    assert res["n_labels_evaluated"] == 13
    assert res["macro_auroc"] > 0.8  # the signal is linear: the probe must find it
    lo, hi = res["macro_auroc_ci"]
    assert lo <= res["macro_auroc"] <= hi


def test_blank_as_negative_policy_equals_sklearn_with_nan_read_as_zero():
    (xtr, ytr), (xte, yte) = _data()
    res = linear_probe(xtr, ytr, xte, yte, test_patient=np.arange(len(xte)) // 2, n_boot=10, return_scores=True,
                       uncertain="ignore", blank="zeros")
    scores = res["scores"].numpy()
    for j, name in enumerate(CHEXPERT_LABELS):
        if name in res["skipped"]:
            continue
        y = np.nan_to_num(yte[:, j], nan=0.0)
        valid = y != -1
        assert res["per_label"][name]["auroc"] == pytest.approx(roc_auc_score(y[valid], scores[valid, j]), abs=1e-6)


def test_probe_matches_sklearn_logistic_ranking():
    # Same model family: sklearn's L2 logistic regression gives nearly the same AUROC.
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xte, yte) = _data(seed=1)
    res = linear_probe(xtr, ytr, xte, yte, eval_labels=["Cardiomegaly", "Edema"], n_boot=0, blank="ignore")
    for name in ["Cardiomegaly", "Edema"]:
        j = CHEXPERT_LABELS.index(name)
        vtr = ~np.isnan(ytr[:, j]) & (ytr[:, j] != -1)
        vte = ~np.isnan(yte[:, j]) & (yte[:, j] != -1)
        clf = LogisticRegression(C=10.0, max_iter=1000).fit(xtr[vtr], ytr[vtr, j])
        ref = roc_auc_score(yte[vte, j], clf.decision_function(xte[vte]))
        assert res["per_label"][name]["auroc"] == pytest.approx(ref, abs=0.02)


def test_label_policies():
    import torch

    y = torch.tensor([[1.0, 0.0, -1.0, float("nan")]])
    t, v = apply_label_policy(y, "ignore", "ignore")
    assert v.tolist() == [[True, True, False, False]]
    t, v = apply_label_policy(y, "ones", "zeros")
    assert v.all() and t.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    t, v = apply_label_policy(y, "zeros", "ignore")
    assert v.tolist() == [[True, True, True, False]] and t[0, 2] == 0


def test_probe_bad_input():
    (xtr, ytr), (xte, yte) = _data(seed=2, n_train=50, n_test=40)
    with pytest.raises(ValueError, match="unknown label names \\['Pneumonitis'\\]"):
        linear_probe(xtr, ytr, xte, yte, eval_labels=["Pneumonitis"])
    with pytest.raises(ValueError, match="probe train labels must have shape"):
        linear_probe(xtr, ytr[:10], xte, yte)
    bad = xte.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="probe test embeddings has NaN/inf"):
        linear_probe(xtr, ytr, bad, yte)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(xtr[:0], ytr[:0], xte, yte)
    with pytest.raises(ValueError, match="uncertain policy"):
        linear_probe(xtr, ytr, xte, yte, uncertain="maybe")


def test_bootstrap_ci_equals_resampling_with_sklearn():
    """The weighted (multiplicity) bootstrap equals resampling patients and scoring each replicate's
    rows with scikit-learn, replicate by replicate: ties, rare labels with one-class replicates, and
    patients of several rows included."""
    import torch

    from cxr_relink.audit.probe import _bootstrap_macro

    rng = np.random.default_rng(3)
    n, n_boot = 120, 40
    scores = torch.tensor(np.round(rng.normal(size=(n, 3)), 1), dtype=torch.float32)  # many ties
    t = torch.tensor((rng.random((n, 3)) < [0.3, 0.5, 0.03]).astype(np.float32))  # label 2: rare
    v = torch.tensor(rng.random((n, 3)) < 0.9)
    patient = rng.integers(0, 45, n)
    used = [0, 1, 2]
    lo, hi = _bootstrap_macro(scores, t, v, used, patient, n_boot, seed=7)

    _, code = np.unique(patient, return_inverse=True)
    rows_of = [np.flatnonzero(code == p) for p in range(code.max() + 1)]
    draw = np.random.default_rng(7)
    reps = []
    for _ in range(n_boot):
        idx = np.concatenate([rows_of[p] for p in draw.integers(0, len(rows_of), len(rows_of))])
        aucs = []
        for j in used:
            keep = idx[v.numpy()[idx, j]]
            y = t.numpy()[keep, j]
            if y.min() != y.max():
                aucs.append(roc_auc_score(y, scores.numpy()[keep, j]))
        if aucs:
            reps.append(np.mean(aucs))
    assert len(reps) == n_boot
    ref = np.quantile(reps, [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(ref), abs=1e-12)
