"""Exporters: synthetic cohort -> official layout -> reader gives back the same studies.

Same studies (patients grouped the same way), labels (NaN kept), report sections, splits, views and
images (exact for Open-I PNG; within JPEG error at quality 100 for MIMIC / CheXpert Plus).
"""

from __future__ import annotations

import filecmp
import gzip

import numpy as np
import pytest

from cxr_relink.datamodules.chexpert_plus import CheXpertPlusReader
from cxr_relink.datamodules.exporters import ID_MAP, export, image_array, main, wrap
from cxr_relink.datamodules.mimic_cxr import MimicCXRReader
from cxr_relink.datamodules.openi import OpenIReader
from cxr_relink.datamodules.reader_utils import clean
from cxr_relink.datamodules.records import NUM_LABELS, Study
from cxr_relink.datamodules.synthetic import SyntheticReader


@pytest.fixture(scope="module")
def cohort() -> list[Study]:
    studies = SyntheticReader(num_patients=10, seed=7, image_size=32).load()
    # one hand-made study with a lateral view and blank / uncertain labels, as real cohorts have
    rng = np.random.default_rng(0)
    labels = np.full(NUM_LABELS, np.nan, dtype=np.float32)
    labels[[2, 5]] = [1.0, -1.0]
    studies.append(Study(
        study_id="extra-1", patient_id=studies[0].patient_id,
        images=[rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(2)], views=["PA", "LATERAL"],
        report="FINDINGS: Mild cardiomegaly with left-sided pleural thickening.\nIMPRESSION: Cardiomegaly.",
        findings="Mild cardiomegaly with left-sided pleural thickening.", impression="Cardiomegaly.",
        labels=labels, split=studies[0].split, source="handmade",
    ))
    return studies


def check_round_trip(orig: list[Study], back: list[Study], ids: dict[str, str], *, views=True, split=True,
                     exact_images=False, view_map=lambda v: v) -> None:
    got = {s.study_id: s for s in back}
    assert len(back) == len(orig) and set(got) == set(ids.values())
    patient_map: dict[str, str] = {}
    for o in orig:
        b = got[ids[o.study_id]]
        assert patient_map.setdefault(o.patient_id, b.patient_id) == b.patient_id  # same grouping by patient
        assert b.findings == clean(o.findings) and b.impression == clean(o.impression)
        np.testing.assert_array_equal(b.labels, o.labels)  # NaN == NaN here
        if split:
            assert b.split == o.split
        if views:
            assert b.views == [view_map(v) for v in o.views]
        assert len(b.images) == len(o.images)
        for bi, oi in zip(b.images, o.images):
            a, e = image_array(bi).astype(int), image_array(oi).astype(int)
            assert a.shape == e.shape
            if exact_images:
                assert (a == e).all()
            else:  # JPEG at quality 100, no chroma subsampling
                assert np.abs(a - e).mean() < 1.0 and np.abs(a - e).max() <= 8
    assert len(set(patient_map.values())) == len(patient_map)


def test_mimic_round_trip(tmp_path, cohort):
    ids = export(cohort, "mimic_cxr", tmp_path)
    back = MimicCXRReader(root=str(tmp_path), views=None, check_images="verify").load()
    check_round_trip(cohort, back, ids)
    # the official quirks: gzip CSVs, alphabetical label columns, 79-column wrapped reports
    with gzip.open(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt") as f:
        header = f.readline().strip().split(",")
    assert header[:3] == ["subject_id", "study_id", "Atelectasis"] and header[-1] == "Support Devices"
    txt = next((tmp_path / "files").rglob("*.txt")).read_text()
    assert txt.lstrip().startswith("FINAL REPORT") and max(map(len, txt.splitlines())) <= 79
    assert all(line.startswith(" ") for line in txt.splitlines() if line)
    # frontal filter: the lateral image of the hand-made study is dropped
    frontal = {s.study_id: s for s in MimicCXRReader(root=str(tmp_path)).load()}
    assert frontal[ids["extra-1"]].views == ["PA"]


def test_chexpert_plus_round_trip(tmp_path, cohort):
    ids = export(cohort, "chexpert_plus", tmp_path)
    back = CheXpertPlusReader(root=str(tmp_path), views=None).load()
    check_round_trip(cohort, back, ids)
    got = {s.study_id: s for s in back}
    assert all(got[ids[o.study_id]].report == o.report for o in cohort)  # the report column is the report


def test_openi_round_trip(tmp_path, cohort):
    ids = export(cohort, "openi", tmp_path)
    # NLM XML layout: no split in the format (hash by patient), views from the projections file
    xml = OpenIReader(root=str(tmp_path), views=None, labels_csv="labels.csv",
                      projections_csv="indiana_projections.csv", on_error="raise").load()
    to_openi = {"PA": "FRONTAL", "AP": "FRONTAL", "LATERAL": "LATERAL"}
    # Open-I has one study per (de-identified) patient: grouping is not carried, so compare per study
    singles = [Study(**{**o.__dict__, "patient_id": o.study_id}) for o in cohort]
    check_round_trip(singles, xml, ids, split=False, exact_images=True, view_map=to_openi.get)
    assert {s.study_id: s for s in xml}[ids["extra-1"]].extras["mesh_major"] == ["Cardiomegaly"]
    # R2Gen-style annotation.json carries the splits
    ann = OpenIReader(root=str(tmp_path), views=None, annotation_json="annotation.json", labels_csv="labels.csv",
                      projections_csv="indiana_projections.csv", on_error="raise").load()
    check_round_trip(singles, ann, ids, exact_images=True, view_map=to_openi.get)


def test_exports_are_deterministic_and_refuse_non_empty(tmp_path, cohort):
    a, b = tmp_path / "a", tmp_path / "b"
    export(cohort[:5], "mimic_cxr", a)
    export(cohort[:5], "mimic_cxr", b)
    for name in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz", ID_MAP):
        assert filecmp.cmp(a / name, b / name, shallow=False)
    with pytest.raises(FileExistsError, match="not empty"):
        export(cohort[:5], "mimic_cxr", a)
    ids = export(cohort[:3], "mimic_cxr", a, overwrite=True)  # replaces the previous export, nothing stale
    assert len(MimicCXRReader(root=str(a), views=None).load()) == len(ids) == 3


def test_cli(tmp_path, capsys):
    out = tmp_path / "openi"
    assert main(["--format", "openi", "--out", str(out), "--num-patients", "3", "--image-size", "32"]) == 0
    n = len(list((out / "ecgen-radiology").glob("*.xml")))
    assert n >= 3 and len(OpenIReader(root=str(out), on_error="raise").load()) == n
    with pytest.raises(SystemExit) as e:
        main(["--format", "openi", "--out", str(out), "--num-patients", "3"])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    assert main(["--format", "openi", "--out", str(out), "--num-patients", "2", "--image-size", "32", "--overwrite"]) == 0


def test_wrap_is_mimic_like():
    text = "word " * 60 + "left-sided"
    lines = wrap(text.strip()).splitlines()
    assert all(len(line) <= 79 and line.startswith(" ") for line in lines)
    assert clean(" ".join(lines)) == clean(text)
