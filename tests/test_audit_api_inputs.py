"""audit.relink's inputs (issue #29, item 6): multi-view rows without study_id, settings that used to
be truncated or accepted silently, tensors that require grad, object-dtype ids, and the tie guard
that must not depend on which variants run. References are brute force on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_relink import audit
from cxr_relink.audit.relinkage import DegenerateEmbeddingsError, Relinkage

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_view(n_studies=60, frac_two=0.2, d=16, seed=0):
    """Rows one per image: a fifth of the studies have two images sharing the study's report row."""
    rng = np.random.default_rng(seed)
    rep_s = rng.normal(size=(n_studies, d))
    views = np.where(np.arange(n_studies) < int(frac_two * n_studies), 2, 1)
    study = np.repeat(np.arange(n_studies), views)
    img = rep_s[study] + 1.2 * rng.normal(size=(len(study), d))
    return img, rep_s[study], study // 2, study  # patient = two studies each


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_two_view_rows_without_study_id_are_refused():
    img, rep, patient, study = _two_view()
    # before: each image its own study, the twin report tied with the target and counted against it
    with pytest.raises(ValueError, match=r"12 rows repeat the patient_id and the exact report embedding of an "
                                         r"earlier row \(e\.g\. row 1 = row 0, patient_id 0\).*study_id") as e:
        audit.relink(img, rep, patient_id=patient, n_boot=0)
    assert "\n" not in str(e.value) and "np.arange" in str(e.value)
    # with study_id: the brute-force full-database R@1 over the studies (no ties: continuous data)
    res = audit.relink(img, rep, patient_id=patient, study_id=study, n_boot=0, ns=["full"], directions=["i2t"])
    s = _unit(img) @ _unit(rep[np.unique(study, return_index=True)[1]]).T
    ref = (s > s[np.arange(len(study)), study][:, None]).sum(1) == 0
    assert res.at(1, "full").value == pytest.approx(ref.mean())
    # each row really its own study: said explicitly, accepted (the twin then ties: pessimistic)
    own = audit.relink(img, rep, patient_id=patient, study_id=np.arange(len(img)), n_boot=0, ns=["full"],
                       directions=["i2t"])
    assert own.at(1, "full").value < res.at(1, "full").value
    # rows of different patients with one report vector (a templated text) are no sign of a study
    assert audit.relink(img, rep, n_boot=0, ns=["full"], directions=["i2t"]).at(1, "full").n == len(img)


@pytest.mark.parametrize("kw, match", [
    (dict(ks=[1.5]), r"ks.*1\.5.*whole number"),
    (dict(ks=[True]), r"ks.*True"),
    (dict(ks=[]), r"ks is empty"),
    (dict(ns=[2.5, "full"]), r"ns.*2\.5.*whole number"),
    (dict(ns=[]), r"ns is empty"),
    (dict(directions=[]), r"directions is empty"),
    (dict(n_boot=-1), r"n_boot.*-1"),
    (dict(n_boot=2.5), r"n_boot.*2\.5"),
])
def test_settings_are_validated_not_truncated(kw, match):
    img, rep, patient, _ = _two_view(frac_two=0)
    with pytest.raises(ValueError, match=match):
        audit.relink(img, rep, patient_id=patient, **kw)
    with pytest.raises(ValueError, match=match):  # the config path (Relinkage) refuses the same values
        Relinkage(**kw, hardneg=False)


def test_no_direction_is_fine_when_a_variant_of_its_own_runs():
    img, rep, patient, _ = _two_view(frac_two=0)
    labels = np.where(np.arange(len(img))[:, None] % 3 == 0, 1.0, np.nan).repeat(14, 1)
    res = audit.relink(img, rep, patient_id=patient, labels=labels, directions=[], n_boot=0)
    assert res.variants == ["hardneg/i2t"]


def test_integral_floats_are_accepted_as_their_integer():
    img, rep, patient, _ = _two_view(frac_two=0)
    a = audit.relink(img, rep, patient_id=patient, ks=[1.0, 5], ns=[10.0, "full"], n_boot=0)
    b = audit.relink(img, rep, patient_id=patient, ks=[1, 5], ns=[10, "full"], n_boot=0)
    assert a.sections == b.sections


def test_tensors_that_require_grad_are_audited():
    img, rep, patient, _ = _two_view(frac_two=0)
    ti = torch.tensor(img, dtype=torch.float32, requires_grad=True)
    tr = torch.tensor(rep, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor(np.where(np.arange(len(img))[:, None] % 3 == 0, 1.0, np.nan).repeat(14, 1),
                          requires_grad=True)
    got = audit.relink(ti, tr, patient_id=torch.as_tensor(patient), labels=labels, n_boot=0)
    ref = audit.relink(img.astype(np.float32), rep.astype(np.float32), patient_id=patient,
                       labels=labels.detach().numpy(), n_boot=0)
    assert got.sections == ref.sections


def test_object_dtype_ids_as_pandas_gives_them():
    img, rep, patient, _ = _two_view(frac_two=0)
    as_str = np.array([f"p{p}" for p in patient], dtype=object)  # a pandas string column's .values
    res = audit.relink(img, rep, patient_id=as_str, n_boot=20)
    ref = audit.relink(img, rep, patient_id=np.array([f"p{p}" for p in patient]), n_boot=20)
    assert res.sections == ref.sections
    as_int = np.array([int(p) for p in patient], dtype=object)
    assert audit.relink(img, rep, patient_id=as_int, n_boot=20).sections == audit.relink(
        img, rep, patient_id=patient, n_boot=20).sections
    mixed = as_str.copy()
    mixed[3] = None  # a missing value in the column
    with pytest.raises(ValueError, match=r"patient_id has dtype object .*NoneType at row 3") as e:
        audit.relink(img, rep, patient_id=mixed, n_boot=0)
    assert ".npz" not in str(e.value)


def _templated(n=40, n_same=30, d=8, seed=1, other_text_ties=False):
    """n studies; the first n_same share one report text and one report vector (a templated normal)."""
    rng = np.random.default_rng(seed)
    rep = rng.normal(size=(n, d))
    rep[:n_same] = rep[0]
    text = np.array(["normal"] * n_same + [f"t{i}" for i in range(n - n_same)], dtype="U40")
    if other_text_ties:
        text[: n_same // 2] = "normal, worded otherwise"  # same vector, another text: a real tie
    img = rep + 0.5 * rng.normal(size=(n, d))
    return img, rep, np.arange(n) // 2, text


def _relink(img, rep, patient, text, **kw):
    # each row its own study, said explicitly (two templated studies of one patient share a report vector)
    return audit.relink(img, rep, patient_id=patient, study_id=np.arange(len(img)), report_text_hash=text,
                        n_boot=0, **kw)


def test_tie_guard_does_not_depend_on_the_variants_run():
    img, rep, patient, text = _templated()
    # 75% of queries tie their true report, all with reports of the same text (templated): legitimate
    s = _unit(img) @ _unit(rep).T
    tied = (s == s.diagonal()[:, None]).sum(1) > 1
    assert tied.mean() == pytest.approx(0.75)
    with_dedup = _relink(img, rep, patient, text, dedup=True)
    # before: audit=all (dedup on) passed and audit=standard (dedup off) refused the same file
    standard = _relink(img, rep, patient, text, dedup=False)
    assert standard.sections["i2t"] == with_dedup.sections["i2t"]
    assert "degenerate" not in standard.sections["i2t"]
    # ties with reports of another text are refused whichever variants run
    img, rep, patient, text = _templated(other_text_ties=True, n_same=36)
    for dedup in (True, False):
        with pytest.raises(DegenerateEmbeddingsError, match="of another text"):
            _relink(img, rep, patient, text, dedup=dedup)
