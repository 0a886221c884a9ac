"""Joins between a cohort's files, checked both ways (issue #29, item 3): a MIMIC split file written
in another id form is refused (never hash-split without a word), conflicting rows for one study are
refused (not "first/last wins"), and a patient is one id wherever it appears. Fixtures: the
real-layout builders of tests/test_readers.py."""

from __future__ import annotations

import csv
import json
import logging
import numpy as np
import pytest

from cxr_relink.datamodules.chexpert_plus import CheXpertPlusReader
from cxr_relink.datamodules.mimic_cxr import MimicCXRReader
from cxr_relink.datamodules.reader_utils import DataError, hash_split
from tests.test_readers import CXP_HEADER, MIMIC_STUDIES, by_id, make_chexpert_plus, make_mimic, write_csv


def _cxp_rows(root):
    with open(root / "df_chexpert_plus_240401.csv", newline="") as f:
        return list(csv.DictReader(f))


def _cxp_write(root, rows):
    write_csv(root / "df_chexpert_plus_240401.csv", CXP_HEADER, [[r[k] for k in CXP_HEADER] for r in rows])


def _rewrite(path, fn):
    """Apply fn to every data row (a list of fields) of a plain CSV written by write_csv."""
    lines = path.read_text().splitlines()
    rows = [lines[0]] + [",".join(fn(line.split(","))) for line in lines[1:]]
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("form", [lambda s: "s" + s, lambda s: "0" + s])
def test_split_file_in_another_id_form_is_refused(tmp_path, form):
    root = make_mimic(tmp_path, gz=False)
    split = root / "mimic-cxr-2.0.0-split.csv"
    _rewrite(split, lambda r: [r[0], form(r[1]), *r[2:]])
    # before: every study silently hash-split by patient (the "test" split chosen by a hash)
    with pytest.raises(DataError) as e:
        MimicCXRReader(root=str(root)).load()
    msg = str(e.value)
    assert "mimic-cxr-2.0.0-split.csv" in msg and "5 of 5 studies" in msg and "\n" not in msg
    assert f"'{form('50414267')}'" in msg and "'50414267'" in msg  # one id in both forms
    assert "split_missing=hash" in msg


def test_split_file_missing_some_studies_is_refused_or_hashed_with_counts(tmp_path, caplog):
    root = make_mimic(tmp_path, gz=False)
    split = root / "mimic-cxr-2.0.0-split.csv"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(line for line in lines if ",51178377," not in line) + "\n")  # one test study gone
    with pytest.raises(DataError, match=r"split\.csv: 1 of 5 studies in the metadata have no row.*'51178377'"):
        MimicCXRReader(root=str(root)).load()
    with pytest.raises(DataError, match="1 of 5 studies"):  # the cohort policy refuses it too, with the same message
        MimicCXRReader(root=str(root), split_policy="cohort").load()
    caplog.set_level(logging.INFO)
    got = by_id(MimicCXRReader(root=str(root), split_missing="hash").load())
    assert got["51178377"].split == hash_split("10000935")  # the explicit option: hashed by patient...
    assert got["50414267"].split == "train" and got["57375967"].split == "val"  # ...the rest official
    assert "1 of 5 studies have no row in mimic-cxr-2.0.0-split.csv; split_missing=hash" in caplog.text
    # a split policy that ignores the file never needs it to join
    assert len(MimicCXRReader(root=str(root), split_policy="hash").load()) == 4
    with pytest.raises(ValueError, match="split_missing"):
        MimicCXRReader(root=str(root), split_missing="drop")


def test_split_rows_naming_no_study_are_counted(tmp_path, caplog):
    root = make_mimic(tmp_path, gz=False)
    split = root / "mimic-cxr-2.0.0-split.csv"
    split.write_text(split.read_text() + "dx,59999999,19999999,test\n")
    caplog.set_level(logging.INFO)
    assert len(MimicCXRReader(root=str(root)).load()) == 4
    assert "1 of 6 studies in mimic-cxr-2.0.0-split.csv match no study in the metadata (e.g. ['59999999'])" in caplog.text


def test_conflicting_split_rows_of_one_study_are_refused(tmp_path):
    root = make_mimic(tmp_path, gz=False)
    split = root / "mimic-cxr-2.0.0-split.csv"
    # study 50414267's two images (d1, d2) given different splits: the last one used to win
    _rewrite(split, lambda r: [*r[:3], "test"] if r[0] == "d2" else r)
    with pytest.raises(DataError, match=r"split\.csv line 3: study 50414267 has split 'test' but line 2 gives it 'train'"):
        MimicCXRReader(root=str(root)).load()
    got = by_id(MimicCXRReader(root=str(root), on_error="skip", max_skip_fraction=0.5).load())
    assert "50414267" not in got and len(got) == 3


def test_patient_ids_must_agree_across_files(tmp_path):
    root = make_mimic(tmp_path, gz=False)
    # the split file names another subject for a study than the metadata does (another release / id form)
    _rewrite(root / "mimic-cxr-2.0.0-split.csv", lambda r: [*r[:2], "p" + r[2], r[3]] if r[1] == "57375967" else r)
    with pytest.raises(DataError, match=r"split\.csv line \d+: study 57375967 has subject_id 'p10000764'; "
                                        r"the metadata gives '10000764'"):
        MimicCXRReader(root=str(root)).load()
    root2 = make_mimic(tmp_path / "b", gz=False)
    _rewrite(root2 / "mimic-cxr-2.0.0-chexpert.csv", lambda r: ["19999999", *r[1:]] if r[1] == "53189527" else r)
    with pytest.raises(DataError, match=r"chexpert\.csv line \d+: study 53189527 has subject_id '19999999'; "
                                        r"the metadata gives '10000032'"):
        MimicCXRReader(root=str(root2)).load()


def test_chexpert_plus_conflicting_labels_or_splits_within_a_study_are_refused(tmp_path):
    root = make_chexpert_plus(tmp_path)
    js = root / "chexbert_labels" / "impression_fixed.json"
    recs = [json.loads(line) for line in js.read_text().splitlines()]
    second = dict(recs[0], path_to_image="train/patient00001/study1/view2_lateral.jpg")
    second["No Finding"], second["Pneumonia"] = None, 1.0  # the study's other image, other labels
    js.write_text("".join(json.dumps(r) + "\n" for r in [*recs, second]))
    # before: the first image row's labels won without a word
    with pytest.raises(DataError, match=r"impression_fixed\.json: the images of study train/patient00001/study1 "
                                        r"have different labels"):
        CheXpertPlusReader(root=str(root)).load()
    # identical labels on both images are one study's labels: accepted
    same = dict(recs[0], path_to_image="train/patient00001/study1/view2_lateral.jpg")
    js.write_text("".join(json.dumps(r) + "\n" for r in [*recs, same]))
    assert len(CheXpertPlusReader(root=str(root)).load()) == 3
    # a study whose image rows carry different splits
    rows = _cxp_rows(root)
    assert rows[1]["path_to_image"] == "train/patient00001/study1/view2_lateral.jpg" and rows[1]["split"] == "train"
    rows[1]["split"] = "valid"
    _cxp_write(root, rows)
    with pytest.raises(DataError, match=r"df_chexpert_plus_240401\.csv line \d+: study train/patient00001/study1 "
                                        r"has split 'valid' but line \d+ gives it 'train'"):
        CheXpertPlusReader(root=str(root)).load()


def test_chexpert_plus_one_patient_one_id(tmp_path):
    root = make_chexpert_plus(tmp_path)
    rows = _cxp_rows(root)
    # patient00001's rows write its id in another form than its directory name ("00001")
    for r in rows:
        if r["deid_patient_id"] == "patient00001":
            r["deid_patient_id"] = "00001"
    # a second study of that patient whose row leaves deid_patient_id blank: the id fell back to the
    # directory name, 'patient00001', so one patient became two (and could land in two splits)
    extra = dict(rows[0], path_to_image="train/patient00001/study2/view1_frontal.jpg", deid_patient_id="")
    img = root / extra["path_to_image"]
    img.parent.mkdir(parents=True)
    img.write_bytes((root / rows[0]["path_to_image"]).read_bytes())
    _cxp_write(root, rows + [extra])
    with pytest.raises(DataError, match=r"df_chexpert_plus_240401\.csv line \d+: patient directory train/patient00001 "
                                        r"holds studies under patient ids \['00001', 'patient00001'\]"):
        CheXpertPlusReader(root=str(root), split_policy="hash", label_file=None).load()
    # every row of the directory blank (or every row with one id): one patient
    for r in rows:
        r["deid_patient_id"] = "" if r["deid_patient_id"] == "00001" else r["deid_patient_id"]
    _cxp_write(root, rows + [extra])
    got = by_id(CheXpertPlusReader(root=str(root), split_policy="hash", label_file=None).load())
    assert got["train/patient00001/study1"].patient_id == got["train/patient00001/study2"].patient_id == "patient00001"


def test_mimic_join_checks_keep_the_official_fixture(tmp_path):
    got = by_id(MimicCXRReader(root=str(make_mimic(tmp_path)), views=None).load())
    assert {k: v.split for k, v in got.items()} == {s[1]: {"validate": "val"}.get(s[4], s[4]) for s in MIMIC_STUDIES}
    assert np.isnan(got["57375967"].labels).all()
