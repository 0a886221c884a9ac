"""Acceptance check of issue #29 (item 6): `audit.relink` on two-view studies without `study_id`
refuses or warns (it used to split each study into two with identical reports, the twins tying
with each other's target, and the pessimistic ties counting them against the model: full-database
R@1 fell without a word)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cxr_relink import audit


def _two_view_rows(n_studies=50, seed=0):
    """One row per image; a fifth of the studies have two images that repeat the study's report row."""
    rng = np.random.default_rng(seed)
    rep_study = rng.normal(size=(n_studies, 16))
    views = np.where(np.arange(n_studies) % 5 == 0, 2, 1)
    study = np.repeat(np.arange(n_studies), views)
    img = rep_study[study] + rng.normal(size=(len(study), 16))
    return img, rep_study[study], study // 2, study


def test_relink_two_view_studies_without_study_id_refuses_or_warns():
    img, rep, patient, study = _two_view_rows()
    refused = warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            audit.relink(img, rep, patient_id=patient, n_boot=0)
        except ValueError as e:
            refused = "study_id" in str(e)
        warned = any("study_id" in str(w.message) for w in caught)
    assert refused or warned, "two-view rows without study_id were audited as separate studies without a word"


def test_relink_with_study_id_audits_the_studies():
    img, rep, patient, study = _two_view_rows()
    res = audit.relink(img, rep, patient_id=patient, study_id=study, n_boot=0, ns=["full"], directions=["i2t"])
    assert res.at(1, "full").n == 50 and res.sections["i2t"]["n_queries"] == len(img)
    # brute force: a query is right when its own study's report scores above every other study's
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    s = u(img) @ u(rep[np.unique(study, return_index=True)[1]]).T
    assert res.at(1, "full").value == pytest.approx(((s > s[np.arange(len(img)), study][:, None]).sum(1) == 0).mean())
