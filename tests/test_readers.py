"""Real-cohort readers on hand-made fixtures that carry the official formats' quirks.

Fixtures are written into tmp_path by the functions below (MIMIC-CXR tree with gzip CSVs, labels in
alphabetical column order with blanks and -1, 79-column reports with `___`, addenda, missing FINDINGS
and no headers at all; CheXpert Plus CSV with ALL-CAPS findings, multi-line quoted reports and CheXbert
JSONL with nulls; Open-I XML with `XXXX`, MeSH, a .tgz and an R2Gen annotation.json). The real Open-I
reports are read from ../shared/data/openi when present.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_relink.datamodules.readers.chexpert_plus import CheXpertPlusReader
from cxr_relink.datamodules.readers.mimic_cxr import MimicCXRReader
from cxr_relink.datamodules.readers.openi import OpenIReader, _xml_sources, parse_ecgen_xml
from cxr_relink.datamodules.readers.common import DataError, apply_uncertainty, cap_studies_per_patient, hash_split
from cxr_relink.datamodules.records import CHEXPERT_LABELS, LABEL_INDEX
from cxr_relink.datamodules.readers.report_sections import normalize_header, parse_report, section_text

OPENI_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "openi" / "NLMCXR_reports.tgz"
SECRET = "Zanzibarite"  # a token planted in report text: it must never appear in errors or logs

ALPHABETICAL = sorted(CHEXPERT_LABELS)


def write_jpeg(path: Path, seed: int, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)


# ---- MIMIC-CXR fixture ------------------------------------------------------------------------------
REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""

REPORT_ADDENDUM = f"""                                 FINAL REPORT
 INDICATION:  ___-year-old man with cough, {SECRET}.
 
 COMPARISON:  Chest radiograph from ___.
 
 IMPRESSIONS: 
 
 Small left pleural effusion.
 
                                 ADDENDUM
 ADDENDUM:  Discussed with Dr. ___ on ___.
 
 IMPRESSION:  Small left pleural effusion with adjacent atelectasis.
"""

REPORT_NO_HEADERS = """                                 FINAL REPORT
 PORTABLE CHEST RADIOGRAPH
 
 Endotracheal tube is 4 cm above the carina.
 
 Lungs are clear. No pneumothorax.
"""

REPORT_LATERAL_ONLY = """ FINDINGS:  Lateral view only.
 IMPRESSION:  Normal.
"""

# (subject, study, [(dicom, view)], report, split)
MIMIC_STUDIES = [
    ("10000032", "50414267", [("d1", "PA"), ("d2", "LATERAL")], REPORT_FULL, "train"),
    ("10000032", "53189527", [("d3", "AP")], REPORT_ADDENDUM, "train"),
    ("10000764", "57375967", [("d4", "AP")], REPORT_NO_HEADERS, "validate"),
    ("10000898", "50771383", [("d5", "LATERAL")], REPORT_LATERAL_ONLY, "test"),
    ("10000935", "51178377", [("d6", "PA")], REPORT_FULL, "test"),
]
# By name; written in alphabetical column order like the official file. "" = blank.
MIMIC_LABELS = {
    "50414267": {"No Finding": "1.0"},
    "53189527": {"Pleural Effusion": "1.0", "Atelectasis": "-1.0", "Pneumothorax": "0.0"},
    "50771383": {"No Finding": "1.0"},
    "51178377": {"Cardiomegaly": "1.0", "Edema": "-1.0"},
    # 57375967 deliberately absent (real studies without labels exist)
}


def make_mimic(root: Path, gz: bool = True, label_overrides: dict | None = None) -> Path:
    meta, split = [], []
    for subject, study, imgs, report, sp in MIMIC_STUDIES:
        d = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        (d / f"s{study}").mkdir(parents=True, exist_ok=True)
        (d / f"s{study}.txt").write_text(report)
        for j, (dicom, view) in enumerate(imgs):
            write_jpeg(d / f"s{study}" / f"{dicom}.jpg", seed=hash((study, j)) % 1000)
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 24, 24, "21800506", "213014.531"])
            split.append([dicom, study, subject, sp])
    ext = ".csv.gz" if gz else ".csv"
    write_csv(root / f"mimic-cxr-2.0.0-metadata{ext}",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
               "Rows", "Columns", "StudyDate", "StudyTime"], meta, gz)
    write_csv(root / f"mimic-cxr-2.0.0-split{ext}", ["dicom_id", "study_id", "subject_id", "split"], split, gz)
    labels = dict(MIMIC_LABELS, **(label_overrides or {}))
    rows = [[s[0], s[1]] + [labels[s[1]].get(n, "") for n in ALPHABETICAL] for s in MIMIC_STUDIES if s[1] in labels]
    for name in ("chexpert", "negbio"):
        write_csv(root / f"mimic-cxr-2.0.0-{name}{ext}", ["subject_id", "study_id"] + ALPHABETICAL, rows, gz)
    return root


def by_id(studies):
    return {s.study_id: s for s in studies}


def test_mimic_reads_official_layout(tmp_path):
    root = make_mimic(tmp_path)
    studies = by_id(MimicCXRReader(root=str(root)).load())
    # the lateral-only study is dropped by the frontal filter
    assert set(studies) == {"50414267", "53189527", "57375967", "51178377"}
    s = studies["50414267"]
    assert s.patient_id == "10000032" and s.split == "train" and s.source == "mimic_cxr"
    assert s.views == ["PA"] and len(s.images) == 1
    assert Path(s.images[0]).is_absolute() and s.images[0].endswith("files/p10/p10000032/s50414267/d1.jpg")
    assert s.findings.startswith("There is no focal consolidation") and "nipple shadows. The cardiomediastinal" in s.findings
    assert s.impression == "No acute cardiopulmonary process."
    assert studies["57375967"].split == "val"  # "validate" -> val
    # labels mapped by name from alphabetical columns; blanks NaN; -1 kept
    lab = studies["53189527"].labels
    assert lab[LABEL_INDEX["Pleural Effusion"]] == 1 and lab[LABEL_INDEX["Atelectasis"]] == -1
    assert lab[LABEL_INDEX["Pneumothorax"]] == 0 and math.isnan(lab[LABEL_INDEX["No Finding"]])
    assert studies["51178377"].labels[LABEL_INDEX["Cardiomegaly"]] == 1
    assert np.isnan(studies["57375967"].labels).all()  # no row in the label file


def test_mimic_sections_addendum_fallback_and_deid(tmp_path):
    studies = by_id(MimicCXRReader(root=str(make_mimic(tmp_path, gz=False))).load())
    add = studies["53189527"]
    assert add.findings == ""  # no FINDINGS section
    assert add.impression == "Small left pleural effusion with adjacent atelectasis."  # last IMPRESSION wins
    assert "___" in add.report  # de-identification kept as written
    nohead = studies["57375967"]
    assert nohead.findings == "" and nohead.impression == "Lungs are clear. No pneumothorax."
    assert nohead.extras["sections_fallback"] is True
    with pytest.raises(DataError, match="section-less report"):
        MimicCXRReader(root=str(tmp_path), fallback_last_paragraph=False).load()


def test_mimic_options(tmp_path):
    root = make_mimic(tmp_path)
    everything = by_id(MimicCXRReader(root=str(root), views=None).load())
    assert "50771383" in everything and everything["50414267"].views == ["PA", "LATERAL"]
    zeros = by_id(MimicCXRReader(root=str(root), uncertainty="zeros").load())
    assert zeros["53189527"].labels[LABEL_INDEX["Atelectasis"]] == 0
    hashed = MimicCXRReader(root=str(root), split_policy="hash", split_fractions=[0.5, 0.25, 0.25]).load()
    assert all(s.split == hash_split(s.patient_id, (0.5, 0.25, 0.25)) for s in hashed)
    capped = MimicCXRReader(root=str(root), max_studies_per_patient=1).load()
    assert sorted(s.patient_id for s in capped) == ["10000032", "10000764", "10000935"]
    assert [s.split for s in MimicCXRReader(root=str(root), split_policy="test").load()] == ["test"] * 4
    reports = MimicCXRReader(root=str(root), reports_only=True, views=None).load()
    assert len(reports) == 5 and all(s.images == [] for s in reports)


def _mimic_study_dir(root, subject, study):
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


def test_mimic_bad_input_raises_naming_the_file(tmp_path, caplog):
    root = make_mimic(tmp_path)
    img = _mimic_study_dir(root, "10000764", "57375967") / "d4.jpg"
    img.unlink()
    with pytest.raises(DataError, match=r"d4\.jpg: missing image file"):
        MimicCXRReader(root=str(root)).load()
    # skip: counted, logged, and refused only above max_skip_fraction
    caplog.set_level(logging.INFO)
    studies = MimicCXRReader(root=str(root), on_error="skip", max_skip_fraction=0.5).load()
    assert "57375967" not in by_id(studies) and len(studies) == 3
    assert "skipped 1 x missing image file" in caplog.text
    with pytest.raises(DataError, match="more than max_skip_fraction=0.1"):
        MimicCXRReader(root=str(root), on_error="skip", max_skip_fraction=0.1).load()
    assert SECRET not in caplog.text


def test_mimic_corrupt_image_eager_and_lazy(tmp_path):
    root = make_mimic(tmp_path)
    bad = _mimic_study_dir(root, "10000935", "51178377") / "d6.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"d6\.jpg: corrupt image file"):
        MimicCXRReader(root=str(root), check_images="verify").load()
    # default check is only "exists": the datamodule names the file when it decodes it
    from cxr_relink.datamodules.datamodule import load_image

    study = by_id(MimicCXRReader(root=str(root)).load())["51178377"]
    with pytest.raises(ValueError, match="d6.jpg could not be decoded"):
        load_image(study.images[0], where="test")


def test_mimic_bad_labels_duplicates_and_empty_reports(tmp_path):
    root = make_mimic(tmp_path / "a", label_overrides={"50414267": {"Edema": "2.0"}})
    with pytest.raises(DataError, match=r"mimic-cxr-2.0.0-chexpert.csv.gz line \d+: bad label value"):
        MimicCXRReader(root=str(root)).load()
    root = make_mimic(tmp_path / "b")
    (root / "files/p10/p10000935/s51178377.txt").write_text("  \n \n")
    with pytest.raises(DataError, match=r"s51178377.txt: empty report"):
        MimicCXRReader(root=str(root)).load()
    root = make_mimic(tmp_path / "c", gz=False)
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"line 8: duplicate dicom_id d1 \(first at line 2\)"):
        MimicCXRReader(root=str(root)).load()


def test_mimic_errors_never_carry_report_text(tmp_path, caplog):
    root = make_mimic(tmp_path)
    (root / "files/p10/p10000032/s53189527.txt").write_text(f" {SECRET} {SECRET}\n")  # header-less, one line
    caplog.set_level(logging.DEBUG)
    studies = by_id(MimicCXRReader(root=str(root)).load())
    assert studies["53189527"].impression == f"{SECRET} {SECRET}"  # fallback keeps it as the text...
    assert SECRET not in caplog.text  # ...but nothing logs it


# ---- section parser -------------------------------------------------------------------------------
def test_section_parser_rules():
    assert normalize_header("IMPRESSIONS") == "impression"
    assert normalize_header("IMPRESSON") == "impression" and normalize_header("FINDNGS") == "findings"
    assert normalize_header("Wet  Read") == "wet read" and normalize_header("COMPARISON EXAM") == "comparison"
    p = parse_report(REPORT_FULL)
    assert [n for n, _ in p.sections] == ["preamble", "examination", "indication", "technique", "comparison",
                                          "findings", "impression"]
    assert p.by_name["preamble"] == "FINAL REPORT" and not p.used_fallback
    p = parse_report(" FINDINGS AND IMPRESSION:  No change.\n")
    assert p.findings == p.impression == "No change."
    p = parse_report("Lungs clear.\n\n1. No acute process. 2. Line tip in SVC.")
    assert p.impression == "1. No acute process. 2. Line tip in SVC." and p.used_fallback
    assert parse_report("").impression == ""


def test_uncertainty_split_and_cap_helpers():
    lab = np.array([1, 0, -1, np.nan] + [0] * 10, dtype=np.float32)
    assert apply_uncertainty(lab, "ones")[2] == 1 and math.isnan(apply_uncertainty(lab, "ignore")[2])
    assert apply_uncertainty(lab, "keep")[2] == -1
    splits = [hash_split(f"p{i}", seed=3) for i in range(2000)]
    assert splits == [hash_split(f"p{i}", seed=3) for i in range(2000)]
    assert 0.75 < splits.count("train") / 2000 < 0.85
    with pytest.raises(ValueError):
        hash_split("p", (0.5, 0.5, 0.5))
    assert cap_studies_per_patient([], 2) == []


# ---- CheXpert Plus fixture ---------------------------------------------------------------------------
CXP_HEADER = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
              "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
              "section_history", "section_comparison", "section_technique", "section_procedure_comments",
              "section_findings", "section_impression", "section_end_of_impression", "section_summary",
              "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
              "insurance_type", "recent_bmi", "deceased", "split"]
CXP_REPORT = "NARRATIVE:\nCHEST, TWO VIEWS\n\nFINDINGS:\nTHE LUNGS ARE CLEAR.\n\nIMPRESSION:\n1. NO ACUTE DISEASE."


def make_chexpert_plus(root: Path, png_release: bool = False) -> Path:
    rows = [
        # (path, F/L, ap_pa, patient, report, findings, impression, split)
        ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "patient00001", CXP_REPORT,
         "THE LUNGS ARE CLEAR.", "1. NO ACUTE DISEASE.", "train"),
        ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "patient00001", CXP_REPORT,
         "THE LUNGS ARE CLEAR.", "1. NO ACUTE DISEASE.", "train"),
        ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "AP", "patient00002",
         "IMPRESSION:\nSupport devices unchanged.", "", "Support devices unchanged.", "train"),
        # both sections blank in the CSV: the report's own headers are parsed instead
        ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP", "patient64541",
         f"HISTORY: {SECRET}\n\nFINDINGS: Mild cardiomegaly.\n\nIMPRESSION: Cardiomegaly.", "", "", "valid"),
    ]
    out = []
    for i, (p, fl, ap, pid, rep, fi, im, sp) in enumerate(rows):
        img = root / ("PNG/" + p.replace(".jpg", ".png") if png_release else p)
        img.parent.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8)
        Image.fromarray(arr).save(img)
        row = {k: "" for k in CXP_HEADER}
        row.update(path_to_image=p, frontal_lateral=fl, ap_pa=ap, deid_patient_id=pid, report=rep,
                   section_findings=fi, section_impression=im, split=sp, age="68", sex="Female")
        out.append([row[k] for k in CXP_HEADER])
    write_csv(root / "df_chexpert_plus_240401.csv", CXP_HEADER, out)
    (root / "chexbert_labels").mkdir(exist_ok=True)
    recs = [
        {"path_to_image": rows[0][0], **{n: None for n in CHEXPERT_LABELS}, "No Finding": 1.0},
        {"path_to_image": rows[2][0], **{n: None for n in CHEXPERT_LABELS}, "Support Devices": 1.0, "Edema": -1.0},
        {"path_to_image": rows[3][0], **{n: None for n in CHEXPERT_LABELS}, "Cardiomegaly": 1.0, "Edema": 0.0},
    ]
    for name in ("impression_fixed.json", "findings_fixed.json"):
        (root / "chexbert_labels" / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


@pytest.mark.parametrize("png_release", [False, True])
def test_chexpert_plus_reads_official_layout(tmp_path, png_release):
    root = make_chexpert_plus(tmp_path, png_release)
    studies = by_id(CheXpertPlusReader(root=str(root)).load())
    assert set(studies) == {"train/patient00001/study1", "train/patient00002/study1", "valid/patient64541/study1"}
    s = studies["train/patient00001/study1"]
    assert s.patient_id == "patient00001" and s.views == ["PA"] and s.split == "train"
    assert s.findings == "THE LUNGS ARE CLEAR." and s.impression == "1. NO ACUTE DISEASE."  # ALL CAPS kept
    assert Path(s.images[0]).is_file() and s.images[0].endswith(".png" if png_release else ".jpg")
    assert s.labels[LABEL_INDEX["No Finding"]] == 1 and np.isnan(s.labels[1:]).all()
    v = studies["valid/patient64541/study1"]
    assert v.split == "val" and v.findings == "Mild cardiomegaly." and v.impression == "Cardiomegaly."
    assert v.labels[LABEL_INDEX["Cardiomegaly"]] == 1 and v.labels[LABEL_INDEX["Edema"]] == 0
    d = studies["train/patient00002/study1"]
    assert d.findings == "" and d.labels[LABEL_INDEX["Edema"]] == -1
    both = by_id(CheXpertPlusReader(root=str(root), views=None, label_file=None).load())
    assert both["train/patient00001/study1"].views == ["PA", "LATERAL"]
    assert np.isnan(both["train/patient00001/study1"].labels).all()
    assert {s.split for s in CheXpertPlusReader(root=str(root), split_policy="test").load()} == {"test"}


def test_chexpert_plus_bad_input(tmp_path, caplog):
    root = make_chexpert_plus(tmp_path)
    (root / "train/patient00002/study1/view1_frontal.jpg").unlink()
    # line 18: the physical line where the row starts (the two rows above hold 8-line quoted reports)
    with pytest.raises(DataError, match=r"df_chexpert_plus_240401.csv line 18: .*view1_frontal.jpg: missing image"):
        CheXpertPlusReader(root=str(root)).load()
    caplog.set_level(logging.INFO)
    assert len(CheXpertPlusReader(root=str(root), on_error="skip", max_skip_fraction=0.5).load()) == 2
    assert SECRET not in caplog.text
    lab = root / "chexbert_labels/impression_fixed.json"
    lab.write_text(lab.read_text().replace('"Edema": 0.0', '"Edema": "maybe"'))
    with pytest.raises(DataError, match="impression_fixed.json line 3: bad label value"):
        CheXpertPlusReader(root=str(root), views=None).load()


# ---- Open-I fixture ----------------------------------------------------------------------------------
def openi_xml(n: int, sections: dict, images: list[str], mesh: list[str]) -> str:
    abstract = "".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in sections.items())
    imgs = "".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest</caption></parentImage>'
                   for i in images)
    mesh_xml = "".join(f"<major>{m}</major>" for m in mesh)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><meta type="rr"/><uId id="CXR{n}"/>'
            f'<pmcId id="{n}"/><MedlineCitation><Article><Abstract>{abstract}</Abstract></Article>'
            f"</MedlineCitation><MeSH>{mesh_xml}</MeSH>{imgs}</eCitation>")


OPENI = [
    (1, {"COMPARISON": "None.", "INDICATION": "Positive TB test", "FINDINGS": "The heart is normal in size.",
         "IMPRESSION": "Normal chest x-XXXX."}, ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"], ["normal"]),
    (2, {"COMPARISON": "", "INDICATION": "XXXX-year-old male, chest pain.", "FINDINGS": "",
         "IMPRESSION": "No active disease."}, ["CXR2_1_IM-0652-1001"], ["Cardiomegaly/borderline"]),
    (10, {"COMPARISON": "", "INDICATION": "", "FINDINGS": "", "IMPRESSION": ""}, ["CXR10_1_IM-0016-1001"], []),
]


def make_openi(root: Path, images: bool = True) -> Path:
    d = root / "ecgen-radiology"
    d.mkdir(parents=True)
    for n, sec, imgs, mesh in OPENI:
        (d / f"{n}.xml").write_text(openi_xml(n, sec, imgs, mesh))
        if images:
            for k, i in enumerate(imgs):
                (root / "images").mkdir(exist_ok=True)
                Image.fromarray(np.full((16, 16), 40 * k, dtype=np.uint8)).save(root / "images" / f"{i}.png")
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"],
              [[1, "1_IM-0001-4001.dcm.png", "Frontal"], [1, "CXR1_1_IM-0001-3001.png", "Frontal"],
               [1, "CXR1_1_IM-0001-4001.png", "Lateral"]])
    labels = {"CXR1": {"No Finding": "1"}, "CXR2": {"Cardiomegaly": "-1"}}  # other labels blank
    write_csv(root / "labels.csv", ["id", "Reports", *CHEXPERT_LABELS],
              [[sid, "(text not used)", *(lab.get(n, "") for n in CHEXPERT_LABELS)] for sid, lab in labels.items()])
    return root


def test_openi_xml_directory_and_tgz(tmp_path, caplog):
    root = make_openi(tmp_path / "openi")
    caplog.set_level(logging.INFO)
    studies = by_id(OpenIReader(root=str(root), projections_csv="indiana_projections.csv",
                                labels_csv="labels.csv", max_skip_fraction=0.5).load())
    assert set(studies) == {"CXR1", "CXR2"}  # CXR10 has no text at all: skipped as empty
    assert "skipped 1 x empty report" in caplog.text
    s1 = studies["CXR1"]
    assert s1.views == ["FRONTAL"] and s1.images[0].endswith("images/CXR1_1_IM-0001-3001.png")
    assert s1.impression == "Normal chest x-XXXX." and s1.findings == "The heart is normal in size."
    assert s1.report.startswith("COMPARISON: None.\nINDICATION: Positive TB test\nFINDINGS:")
    assert s1.extras["mesh_major"] == ["normal"] and s1.patient_id == "CXR1"
    assert s1.labels[LABEL_INDEX["No Finding"]] == 1 and np.isnan(s1.labels[LABEL_INDEX["Cardiomegaly"]])
    s2 = studies["CXR2"]
    assert s2.findings == "" and s2.views == ["UNKNOWN"] and s2.labels[LABEL_INDEX["Cardiomegaly"]] == -1
    assert "XXXX-year-old" in s2.report
    assert all(s.split in ("train", "val", "test") for s in studies.values())
    # no label file: all NaN; the archive is read without extracting; no images -> reports only
    tgz = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(root / "ecgen-radiology", arcname="ecgen-radiology")
    for r in (str(tgz), str(tmp_path)):
        ro = by_id(OpenIReader(root=r, max_skip_fraction=0.5).load())
        assert set(ro) == {"CXR1", "CXR2"} and ro["CXR1"].images == [] and np.isnan(ro["CXR1"].labels).all()
        assert ro["CXR1"].findings == s1.findings


def test_openi_bad_input(tmp_path):
    root = make_openi(tmp_path)
    (root / "images" / "CXR2_1_IM-0652-1001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"2.xml: .*CXR2_1_IM-0652-1001.png: corrupt image file"):
        OpenIReader(root=str(root), check_images="verify", on_error="raise").load()
    with pytest.raises(DataError, match="more than max_skip_fraction"):
        OpenIReader(root=str(root)).load()  # 1 of 3 empty > 1%
    (root / "ecgen-radiology" / "3.xml").write_text("<eCitation><uId id='CXR2'/></eCitation>")
    with pytest.raises(DataError, match=r"3.xml: duplicate study id"):
        OpenIReader(root=str(root), on_error="raise").load()


def test_openi_r2gen_annotation(tmp_path):
    (tmp_path / "images" / "CXR7_IM-1").mkdir(parents=True)
    for k in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "CXR7_IM-1" / f"{k}.png")
    ann = {"train": [{"id": "CXR7_IM-1", "report": "The lungs are clear. No effusion.",
                      "image_path": ["CXR7_IM-1/0.png", "CXR7_IM-1/1.png"], "split": "train"}],
           "val": [{"id": "CXR8_IM-2", "report": "FINDINGS: Clear.\nIMPRESSION: Normal.", "image_path": [], "split": "val"}],
           "test": []}
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    studies = by_id(OpenIReader(root=str(tmp_path), annotation_json="annotation.json", reports_only=True).load())
    assert studies["CXR7_IM-1"].findings == "The lungs are clear. No effusion." and studies["CXR7_IM-1"].split == "train"
    assert studies["CXR8_IM-2"].impression == "Normal." and studies["CXR8_IM-2"].split == "val"
    with_images = by_id(OpenIReader(root=str(tmp_path), annotation_json="annotation.json", max_skip_fraction=0.5).load())
    assert len(with_images["CXR7_IM-1"].images) == 2 and "CXR8_IM-2" not in with_images


# ---- the real Open-I reports -------------------------------------------------------------------------
@pytest.mark.skipif(not OPENI_ARCHIVE.is_file(), reason=f"real Open-I reports not at {OPENI_ARCHIVE}")
@pytest.mark.slow
def test_openi_real_reports_from_archive(caplog):
    """All 3,955 published reports parse; section counts match NLM's (3,425 / 3,921 / 3,419)."""
    n = findings = impression = both = 0
    emptied = Counter()  # sections of only XXXX marks, punctuation or their heading (docs/cohorts.md)
    for where, stream in _xml_sources(OPENI_ARCHIVE):
        sec = parse_ecgen_xml(stream, where)["sections"]
        f, i = bool(sec.get("FINDINGS")), bool(sec.get("IMPRESSION"))
        n, findings, impression, both = n + 1, findings + f, impression + i, both + (f and i)
        emptied.update(k for k, v in sec.items() if v and not section_text(v, heading=k))
    assert (n, findings, impression, both) == (3955, 3425, 3921, 3419)
    assert emptied == {"COMPARISON": 841, "INDICATION": 203}  # none in FINDINGS or IMPRESSION
    # The reader: 28 reports have no section text at all and are skipped as empty (0.7% < 1%).
    caplog.set_level(logging.INFO)
    studies = OpenIReader(root=str(OPENI_ARCHIVE.parent)).load()
    assert len(studies) == 3955 - 28 and "skipped 28 x empty report" in caplog.text
    assert sum(bool(s.findings) for s in studies) == 3425 and sum(bool(s.impression) for s in studies) == 3921
    assert all(s.images == [] and np.isnan(s.labels).all() for s in studies)
    # 7,470 image references in all; the 28 empty reports hold 40 of them
    assert sum(len(s.extras["image_ids"]) for s in studies) == 7470 - 40


def test_blank_and_frontal_only_views(tmp_path):
    root = make_mimic(tmp_path / "m", gz=False)
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    meta.write_text(meta.read_text().replace("d6,10000935,51178377,CHEST (PA AND LAT),PA,", "d6,10000935,51178377,CHEST (PA AND LAT),,"))
    assert "51178377" not in by_id(MimicCXRReader(root=str(root)).load())  # blank ViewPosition: not frontal
    kept = by_id(MimicCXRReader(root=str(root), keep_unknown_views=True).load())
    assert kept["51178377"].views == ["UNKNOWN"]
    cxp = make_chexpert_plus(tmp_path / "c")
    csv_path = cxp / "df_chexpert_plus_240401.csv"
    csv_path.write_text(csv_path.read_text().replace("Frontal,AP,patient00002", "Frontal,,patient00002"))
    assert by_id(CheXpertPlusReader(root=str(cxp)).load())["train/patient00002/study1"].views == ["FRONTAL"]


@pytest.mark.parametrize("cohort", ["mimic_cxr", "chexpert_plus", "openi"])
def test_data_configs_build_the_readers(tmp_path, cohort):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from tests.conftest import CONFIG_DIR

    root = {"mimic_cxr": make_mimic, "chexpert_plus": make_chexpert_plus, "openi": make_openi}[cohort](tmp_path / "d")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train.yaml", overrides=[f"data={cohort}", f"data.root={root}", "data.reader.max_skip_fraction=0.5"])
    GlobalHydra.instance().clear()
    assert cfg.data._target_ == "cxr_relink.datamodules.datamodule.CXRDataModule"
    studies = instantiate(cfg.data.reader).load()
    assert len(studies) == {"mimic_cxr": 4, "chexpert_plus": 3, "openi": 2}[cohort]


# ---- issue 13: documented paths and bad input that passed silently or crashed unclearly ------------------
def _datamodule(reader, tmp_path):
    from cxr_relink.datamodules.datamodule import CXRDataModule

    return CXRDataModule(reader, tokenizer={"vocab_size": 64, "min_frequency": 1}, cache_dir=str(tmp_path / "tok"),
                         batch_size=2, image_size=16)


def test_openi_without_images_names_the_missing_directory(tmp_path, caplog):
    root = make_openi(tmp_path / "openi", images=False)
    caplog.set_level(logging.INFO)
    dm = _datamodule(OpenIReader(root=str(root), split_policy="train", max_skip_fraction=0.5), tmp_path)
    dm.setup("fit")
    assert "reports only" in caplog.text and str(root / "images") in caplog.text
    # before: torch's "num_samples=0" naming nothing; now the missing directory, and what to do
    with pytest.raises(ValueError, match=r"none of its 2 studies has an image \(no image directory .*openi/images"):
        dm.train_dataloader()
    assert dm.has_labels is False  # Open-I without labels_csv: the label audits can tell
    labelled = _datamodule(OpenIReader(root=str(root), split_policy="train", labels_csv="labels.csv",
                                       max_skip_fraction=0.5), tmp_path)
    assert labelled.has_labels is True


def _annotation(tmp_path, ann, name="annotation.json"):
    (tmp_path / name).write_text(json.dumps(ann))
    return name


def _item(i, split=None, **kw):
    it = {"id": f"CXR{i}_IM-{i}", "report": f"The lungs are clear, study {i}.", "image_path": [f"CXR{i}/0.png"]}
    if split is not None:
        it["split"] = split
    return {**it, **kw}


def test_openi_annotation_split_names_raise_or_map(tmp_path, caplog):
    ann = _annotation(tmp_path, {"train": [_item(1, "train")], "dev": [_item(2, "dev"), _item(3, "dev")]})
    # before: "dev" was re-split by hash without a word (val studies moved into train)
    with pytest.raises(DataError, match=r"annotation.json \[dev\]\[0\]: unknown split name 'dev'.*split_map"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True).load()
    mapped = by_id(OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, split_map={"dev": "val"}).load())
    assert [mapped[f"CXR{i}_IM-{i}"].split for i in (1, 2, 3)] == ["train", "val", "val"]
    hashed = OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, split_policy="hash").load()
    assert all(s.split == hash_split(s.patient_id) for s in hashed)  # an explicit re-split needs no names
    with pytest.raises(ValueError, match="split_map values"):
        OpenIReader(root=str(tmp_path), split_map={"dev": "holdout"})
    # "validation" is a known name (the case reported: 240 of 296 val studies had moved to train)
    ann = _annotation(tmp_path, {"validation": [_item(i, "validation") for i in range(4, 9)]}, "v.json")
    assert {s.split for s in OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True).load()} == {"val"}
    # an item's own split contradicting its list
    ann = _annotation(tmp_path, {"train": [_item(1, "test")]}, "c.json")
    with pytest.raises(DataError, match=r"c.json \[train\]\[0\]: split 'test' contradicts"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True).load()
    # a plain list: items without a split are hash-split, with a warning that counts them
    caplog.set_level(logging.INFO)
    ann = _annotation(tmp_path, [_item(1, "test"), _item(2), _item(3)], "l.json")
    got = by_id(OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True).load())
    assert got["CXR1_IM-1"].split == "test" and got["CXR2_IM-2"].split == hash_split("CXR2_IM-2")
    assert "l.json: 2 studies have no split; split by patient hash" in caplog.text
    with pytest.raises(DataError, match="split_policy=cohort but patient CXR2_IM-2 has no split"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, split_policy="cohort").load()


def test_openi_annotation_image_path_string_and_views_file(tmp_path, caplog):
    for k in range(2):
        (tmp_path / "images" / "CXR1").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "CXR1" / f"{k}.png")
    ann = _annotation(tmp_path, {"train": [_item(1, "train", image_path="CXR1/0.png")],
                                 "test": [_item(2, "test", image_path=["CXR1/0.png", "CXR1/1.png"])]})
    caplog.set_level(logging.INFO)
    got = by_id(OpenIReader(root=str(tmp_path), annotation_json=ann).load())
    # before: the string was read character by character ("C", "X", "R", ...)
    assert got["CXR1_IM-1"].images == [str((tmp_path / "images/CXR1/0.png").resolve())]
    assert got["CXR1_IM-1"].extras["image_ids"] == ["CXR1/0.png"]
    assert got["CXR2_IM-2"].views == ["UNKNOWN", "UNKNOWN"]
    assert "3 images of 2 studies have no known view (annotation.json records no views)" in caplog.text
    assert "lateral images become audit queries" in caplog.text and "image_path, projection" in caplog.text
    write_csv(tmp_path / "views.csv", ["image_path", "projection"], [["CXR1/0.png", "Frontal"], ["CXR1/1.png", "Lateral"]])
    got = by_id(OpenIReader(root=str(tmp_path), annotation_json=ann, projections_csv="views.csv").load())
    assert got["CXR2_IM-2"].views == ["FRONTAL"] and got["CXR2_IM-2"].images[0].endswith("CXR1/0.png")
    ann = _annotation(tmp_path, {"train": [_item(1, "train", image_path=7)]}, "bad.json")
    with pytest.raises(DataError, match=r"bad.json \[train\]\[0\]: image_path must be a path or a list"):
        OpenIReader(root=str(tmp_path), annotation_json=ann).load()


HEADER_ONLY_MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 INDICATION:
 FINDINGS:
 IMPRESSION:
"""


def test_section_parser_never_returns_header_words():
    for text in (HEADER_ONLY_MIMIC, "FINDINGS:\nIMPRESSION:", "IMPRESSION:", "FINAL REPORT\n\nIMPRESSION:\n"):
        p = parse_report(text)
        assert not p.has_text and p.findings == "" and p.impression == "", text
    # only the exam header block: nothing about the image (before: impression "___ cough IMPRESSION:")
    assert not parse_report("FINAL REPORT\nINDICATION: ___ cough\nIMPRESSION:").has_text
    # the fallback is the last paragraph with text, without header words
    p = parse_report("INDICATION: ___ cough\n\nLungs are clear.\n\nIMPRESSION:\n")
    assert p.has_text and p.impression == "Lungs are clear." and p.used_fallback
    assert parse_report(REPORT_FULL).has_text and parse_report(REPORT_NO_HEADERS).has_text


def test_header_only_reports_are_empty(tmp_path):
    root = make_mimic(tmp_path / "m")
    (root / "files/p10/p10000935/s51178377.txt").write_text(HEADER_ONLY_MIMIC)
    (root / "files/p10/p10000764/s57375967.txt").write_text(REPORT_FULL)  # the header-less one, out of the way
    for fallback in (True, False):  # before: kept (raw header block as the report) in both
        with pytest.raises(DataError, match=r"s51178377.txt: empty report \(section headers only\)"):
            MimicCXRReader(root=str(root), fallback_last_paragraph=fallback).load()
    cxp = make_chexpert_plus(tmp_path / "c")
    csv_path = cxp / "df_chexpert_plus_240401.csv"
    # before: the study's impression was the literal "IMPRESSION:"
    csv_path.write_text(csv_path.read_text().replace(f"HISTORY: {SECRET}\n\nFINDINGS: Mild cardiomegaly.\n\n"
                                                     "IMPRESSION: Cardiomegaly.", "FINDINGS:\nIMPRESSION:"))
    with pytest.raises(DataError, match=r"csv line \d+: empty report \(section headers only\)"):
        CheXpertPlusReader(root=str(cxp)).load()
    ann = _annotation(tmp_path, {"train": [_item(1, "train", report="FINDINGS:\nIMPRESSION:")]})
    with pytest.raises(DataError, match=r"annotation.json \[train\]\[0\]: empty report \(section headers only\)"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, on_error="raise").load()


def test_missing_or_renamed_label_columns_are_named(tmp_path):
    root = make_mimic(tmp_path / "m", gz=False)
    lab = root / "mimic-cxr-2.0.0-chexpert.csv"
    lab.write_text(lab.read_text().replace("Pleural Effusion", "Pleural_Effusion", 1))
    # before: Pleural Effusion silently blank for every study
    with pytest.raises(DataError, match=r"chexpert.csv: missing label column\(s\)/key\(s\) \['Pleural Effusion'\]; "
                                        r"found similar names \['Pleural_Effusion'\]"):
        MimicCXRReader(root=str(root)).load()
    lab.write_text("\n".join(",".join(c for c in line.split(",")[:-1]) for line in lab.read_text().splitlines()))
    with pytest.raises(DataError, match=r"missing label column\(s\)/key\(s\) \['Pleural Effusion', 'Support Devices'\]"):
        MimicCXRReader(root=str(root)).load()
    cxp = make_chexpert_plus(tmp_path / "c")
    js = cxp / "chexbert_labels/impression_fixed.json"
    js.write_text(js.read_text().replace('"Lung Opacity"', '"lung_opacity"'))
    with pytest.raises(DataError, match=r"impression_fixed.json line 1: missing .*\['Lung Opacity'\]; found similar names \['lung_opacity'\]"):
        CheXpertPlusReader(root=str(cxp)).load()
    op = make_openi(tmp_path / "o")
    (op / "labels.csv").write_text((op / "labels.csv").read_text().replace("Edema", "Oedema", 1))
    with pytest.raises(DataError, match=r"labels.csv: missing label column\(s\)/key\(s\) \['Edema'\]"):
        OpenIReader(root=str(op), labels_csv="labels.csv", max_skip_fraction=0.5).load()


def test_verify_decodes_the_whole_image(tmp_path):
    root = make_mimic(tmp_path)
    img = _mimic_study_dir(root, "10000935", "51178377") / "d6.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(img, quality=95)
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])  # truncated: headers intact, half the scan data gone
    with Image.open(img) as im:
        im.verify()  # the independent reference: PIL's verify() passes it (why "verify" must decode)
    with pytest.raises(DataError, match=r"d6\.jpg: corrupt image file"):
        MimicCXRReader(root=str(root), check_images="verify").load()
    assert len(MimicCXRReader(root=str(root), check_images="exists").load()) == 4


def test_non_utf8_bytes_are_named_and_skippable(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = make_mimic(tmp_path / "m", gz=False)
    rep = root / "files/p10/p10000935/s51178377.txt"
    rep.write_bytes(REPORT_FULL.encode().replace(b"normal", b"n\xe9rmal"))  # latin-1 byte
    with pytest.raises(DataError, match=r"s51178377.txt: report file is not valid UTF-8 \(byte \d+\)"):
        MimicCXRReader(root=str(root)).load()
    got = by_id(MimicCXRReader(root=str(root), on_error="skip", max_skip_fraction=0.5).load())
    assert "51178377" not in got and len(got) == 3 and "skipped 1 x report file is not valid UTF-8" in caplog.text
    rep.write_text(REPORT_FULL)
    split = root / "mimic-cxr-2.0.0-split.csv"
    split.write_bytes(split.read_bytes().replace(b"d4,57375967,10000764,validate", b"d4,57375967,10000764,valid\xffte"))
    with pytest.raises(DataError, match=r"mimic-cxr-2.0.0-split.csv line 5: not valid UTF-8"):
        MimicCXRReader(root=str(root)).load()
    got = by_id(MimicCXRReader(root=str(root), on_error="skip", max_skip_fraction=0.5).load())
    assert "57375967" not in got and len(got) == 3  # the study of the bad row, not a silent partial one
    # CheXpert Plus: the CSV and the CheXbert labels
    cxp = make_chexpert_plus(tmp_path / "c")
    csv_path = cxp / "df_chexpert_plus_240401.csv"
    csv_path.write_bytes(csv_path.read_bytes().replace(b"Support devices unchanged.", b"Support devices \x96 unchanged."))
    with pytest.raises(DataError, match=r"df_chexpert_plus_240401.csv line 18: not valid UTF-8"):
        CheXpertPlusReader(root=str(cxp)).load()
    assert "train/patient00002/study1" not in by_id(CheXpertPlusReader(root=str(cxp), on_error="skip",
                                                                       max_skip_fraction=0.5).load())
    cxp = make_chexpert_plus(tmp_path / "c2")
    js = cxp / "chexbert_labels/impression_fixed.json"
    js.write_bytes(js.read_bytes().replace(b"patient64541", b"patient6454\xff"))
    with pytest.raises(DataError, match=r"impression_fixed.json line 3: not valid UTF-8"):
        CheXpertPlusReader(root=str(cxp)).load()
    # annotation.json: the item is named
    (tmp_path / "a.json").write_bytes(json.dumps({"train": [_item(1, "train"), _item(2, "train")]}).encode()
                                      .replace(b"study 2", b"study \xe92"))
    with pytest.raises(DataError, match=r"a.json \[train\]\[1\]: not valid UTF-8"):
        OpenIReader(root=str(tmp_path), annotation_json="a.json", reports_only=True, on_error="raise").load()
    got = OpenIReader(root=str(tmp_path), annotation_json="a.json", reports_only=True, max_skip_fraction=0.5).load()
    assert [s.study_id for s in got] == ["CXR1_IM-1"]
    assert SECRET not in caplog.text


def test_short_csv_row_names_file_and_line(tmp_path, caplog):
    root = make_mimic(tmp_path, gz=False)
    split = root / "mimic-cxr-2.0.0-split.csv"
    lines = split.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 2)[0]  # "d3,53189527": two fields short
    split.write_text("\n".join(lines) + "\n")
    # before: AttributeError: 'NoneType' object has no attribute 'strip'
    with pytest.raises(DataError, match=r"mimic-cxr-2.0.0-split.csv line 4: row has 2 fields, the header has 4"):
        MimicCXRReader(root=str(root)).load()
    caplog.set_level(logging.INFO)
    got = by_id(MimicCXRReader(root=str(root), on_error="skip", max_skip_fraction=0.5).load())
    assert "53189527" not in got and "skipped 1 x row has 2 fields" in caplog.text


def test_duplicated_openi_id_counts_both_copies(tmp_path, caplog):
    root = make_openi(tmp_path)
    xml = (root / "ecgen-radiology" / "1.xml").read_text()
    (root / "ecgen-radiology" / "11.xml").write_text(xml.replace('pmcId id="1"', 'pmcId id="11"'))
    caplog.set_level(logging.INFO)
    got = OpenIReader(root=str(root), max_skip_fraction=0.9).load()
    assert [s.study_id for s in got] == ["CXR2"]
    # 4 records: CXR1 twice (both dropped), CXR2, CXR10 (empty). Before: "skipped 1" for the pair.
    assert "skipped 2 x duplicate study id" in caplog.text and "skipped 3 of 4 studies" in caplog.text


def test_unparseable_openi_xml_honours_on_error(tmp_path, caplog):
    root = make_openi(tmp_path)
    (root / "ecgen-radiology" / "5.xml").write_bytes(b"<eCitation><uId id='CXR5'/>")
    with pytest.raises(DataError, match=r"5.xml: not well-formed XML"):
        OpenIReader(root=str(root), on_error="raise").load()
    caplog.set_level(logging.INFO)
    assert len(OpenIReader(root=str(root), max_skip_fraction=0.9).load()) == 2
    assert "skipped 1 x not well-formed XML" in caplog.text


def test_cap_studies_per_patient_logs_what_it_drops(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    capped = MimicCXRReader(root=str(make_mimic(tmp_path)), max_studies_per_patient=1).load()
    assert len(capped) == 3
    assert "max_studies_per_patient=1: dropped 1 of 4 studies (1 patients had more)" in caplog.text


def test_eval_dataloader_serves_chosen_items(tmp_path):
    dm = _datamodule(OpenIReader(root=str(make_openi(tmp_path / "o")), split_policy="train", max_skip_fraction=0.5),
                     tmp_path)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 3  # CXR1: two images, CXR2: one
    batch = next(iter(dm.eval_dataloader("train", indices=[2])))  # e.g. the probe's seeded subset
    assert batch["index"].tolist() == [2] and batch["image"].shape == (1, 1, 16, 16)


# ---- issue 23: silent inputs that were still accepted ------------------------------------------------
def test_label_ids_matching_no_study_are_refused(tmp_path, caplog):
    root = make_mimic(tmp_path / "m", gz=False)
    lab = root / "mimic-cxr-2.0.0-chexpert.csv"
    rows = [line.split(",") for line in lab.read_text().splitlines()]
    prefixed = [rows[0]] + [[r[0], "s" + r[1], *r[2:]] for r in rows[1:]]  # "s50414267": the directory name
    lab.write_text("\n".join(",".join(r) for r in prefixed) + "\n")
    # before: every label blank without a word
    with pytest.raises(DataError, match=r"chexpert.csv: none of its 4 label rows matches one of the 5 studies "
                                        r"\(label ids e\.g\. \['s50414267'.*study ids e\.g\. \['50414267'"):
        MimicCXRReader(root=str(root)).load()
    # some match: a warning with both counts (57375967 has no row; one row names no study)
    lab.write_text("\n".join(",".join(r) for r in rows[:-1] + [[rows[-1][0], "59999999", *rows[-1][2:]]]) + "\n")
    caplog.set_level(logging.INFO)
    got = by_id(MimicCXRReader(root=str(root)).load())
    assert np.isnan(got["51178377"].labels).all() and got["53189527"].labels[LABEL_INDEX["Pleural Effusion"]] == 1
    assert ("mimic_cxr: mimic-cxr-2.0.0-chexpert.csv: 2 of 5 studies have no label row (labels blank); "
            "1 of 4 label rows match no study (e.g. ['59999999'])") in caplog.text
    # Open-I labels.csv keyed by another id scheme; CheXbert labels keyed by another path prefix
    op = make_openi(tmp_path / "o")
    (op / "labels.csv").write_text((op / "labels.csv").read_text().replace("CXR1,", "1,").replace("CXR2,", "2,"))
    with pytest.raises(DataError, match=r"labels.csv: none of its 2 label rows matches one of the 3 studies "
                                        r"\(label ids e\.g\. \['1', '2'\]; study ids e\.g\. \['CXR1', 'CXR10', 'CXR2'\]"):
        OpenIReader(root=str(op), labels_csv="labels.csv", max_skip_fraction=0.5).load()
    cxp = make_chexpert_plus(tmp_path / "c")
    js = cxp / "chexbert_labels/impression_fixed.json"
    js.write_text(js.read_text().replace('"path_to_image": "', '"path_to_image": "CheXpert-v1.0/'))
    with pytest.raises(DataError, match=r"impression_fixed.json: none of its 3 label rows matches one of the 4 images "
                                        r"\(label ids e\.g\. \['CheXpert-v1.0/train/patient00001"):
        CheXpertPlusReader(root=str(cxp)).load()


def test_deid_marks_only_and_heading_only_reports_are_empty(tmp_path, caplog):
    root = make_mimic(tmp_path / "m")
    (root / "files/p10/p10000935/s51178377.txt").write_text(
        "                                 FINAL REPORT\n INDICATION:  ___\n\n FINDINGS:  ___.\n\n IMPRESSION:  ___, ___\n")
    with pytest.raises(DataError, match=r"s51178377.txt: empty report \(de-identification marks only\)"):
        MimicCXRReader(root=str(root)).load()
    p = parse_report("FINDINGS: ___.\n\nIMPRESSION: No effusion since ___.")
    assert p.has_text and p.findings == "" and p.impression == "No effusion since ___."
    # Open-I XML: a section holding only XXXX or its own heading is an empty section
    d = tmp_path / "o" / "ecgen-radiology"
    d.mkdir(parents=True)
    secs = {
        1: {"COMPARISON": "XXXX, XXXX.", "INDICATION": "XXXX", "FINDINGS": "XXXX.", "IMPRESSION": "XXXX XXXX"},
        2: {"COMPARISON": "", "INDICATION": "", "FINDINGS": "FINDINGS:", "IMPRESSION": "Impression:"},
        3: {"COMPARISON": "XXXX", "INDICATION": "Cough", "FINDINGS": "XXXX", "IMPRESSION": "No active disease."},
        4: {"COMPARISON": "", "INDICATION": "Chest pain", "FINDINGS": "Findings:", "IMPRESSION": ""},
    }
    for n, s in secs.items():
        (d / f"{n}.xml").write_text(openi_xml(n, s, [], []))
    caplog.set_level(logging.INFO)
    got = by_id(OpenIReader(root=str(tmp_path / "o"), max_skip_fraction=0.9).load())
    assert set(got) == {"CXR3"}  # before: all four kept, with "XXXX." / "FINDINGS:" as report text
    assert got["CXR3"].findings == "" and got["CXR3"].impression == "No active disease."
    assert got["CXR3"].report == "COMPARISON: XXXX\nINDICATION: Cough\nFINDINGS: XXXX\nIMPRESSION: No active disease."
    assert "skipped 1 x empty report (de-identification marks only)" in caplog.text
    assert "skipped 1 x empty report (section headers only)" in caplog.text
    assert "skipped 1 x report without FINDINGS or IMPRESSION" in caplog.text
    # R2Gen annotation.json and CheXpert Plus
    ann = _annotation(tmp_path, {"train": [_item(1, "train", report="XXXX XXXX. XXXX.")]})
    with pytest.raises(DataError, match=r"\[train\]\[0\]: empty report \(de-identification marks only\)"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, on_error="raise").load()
    cxp = make_chexpert_plus(tmp_path / "c")
    csv_path = cxp / "df_chexpert_plus_240401.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    col = {c: k for k, c in enumerate(rows[0])}
    # the third image row (line 18): its report and both section columns hold only "___" marks
    rows[3][col["report"]], rows[3][col["section_findings"]], rows[3][col["section_impression"]] = \
        "IMPRESSION:\n___.", "___", "___."
    write_csv(csv_path, rows[0], rows[1:])
    with pytest.raises(DataError, match=r"csv line 18: empty report \(de-identification marks only\)"):
        CheXpertPlusReader(root=str(cxp)).load()


def test_chexpert_plus_report_longer_than_csv_default_field_limit(tmp_path, monkeypatch):
    import cxr_relink.datamodules.readers.common as ru

    root = make_chexpert_plus(tmp_path)
    csv_path = root / "df_chexpert_plus_240401.csv"
    long_findings = "THE LUNGS ARE CLEAR. " * 7000  # 147,000 characters > csv's default 131,072
    csv_path.write_text(csv_path.read_text().replace("THE LUNGS ARE CLEAR.", long_findings))
    # before: _csv.Error: field larger than field limit (131072), naming no file
    got = by_id(CheXpertPlusReader(root=str(root)).load())
    assert got["train/patient00001/study1"].findings == " ".join(long_findings.split())
    # above the reader's own limit: a DataError naming the file and the row
    monkeypatch.setattr(ru, "CSV_FIELD_LIMIT", 140_000)
    old = ru.csv.field_size_limit(140_000)
    try:
        with pytest.raises(DataError, match=r"df_chexpert_plus_240401.csv line 2: .*field larger than"):
            CheXpertPlusReader(root=str(root)).load()
    finally:
        ru.csv.field_size_limit(old)


def test_csv_and_csv_gz_both_present_are_refused(tmp_path):
    root = make_mimic(tmp_path / "m", gz=True)
    make_mimic(tmp_path / "m", gz=False)  # e.g. gunzip -k: both copies now sit side by side
    # before: the .csv was read silently, whatever the .gz held
    with pytest.raises(DataError, match=r"both .*mimic-cxr-2.0.0-metadata.csv and .*mimic-cxr-2.0.0-metadata.csv.gz"):
        MimicCXRReader(root=str(root)).load()
    cxp = make_chexpert_plus(tmp_path / "c")
    csv_path = cxp / "df_chexpert_plus_240401.csv"
    (cxp / "df_chexpert_plus_240401.csv.gz").write_bytes(gzip.compress(csv_path.read_bytes()))
    with pytest.raises(DataError, match=r"both .*df_chexpert_plus_240401.csv and .*df_chexpert_plus_240401.csv.gz"):
        CheXpertPlusReader(root=str(cxp)).load()
    csv_path.unlink()
    assert len(CheXpertPlusReader(root=str(cxp)).load()) == 3


def test_annotation_split_key_hydra_cannot_express(tmp_path):
    # a key that is no split name (four spaces): the items' own split fields decide
    ann = _annotation(tmp_path, {"train": [_item(1, "train")], "    ": [_item(2, "test"), _item(3, "test")]})
    # before: "unknown split name '    '", curable only by split_map={"    ": test}, which an override cannot write
    got = by_id(OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True).load())
    assert [got[f"CXR{i}_IM-{i}"].split for i in (1, 2, 3)] == ["train", "test", "test"]
    # items without their own split under such a key: the error points at split_map_file
    ann = _annotation(tmp_path, {"train": [_item(1)], "    ": [_item(2), _item(3)]}, "n.json")
    with pytest.raises(DataError, match=r"n.json \[    \]\[0\]: unknown split name '    '.*split_map_file"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True).load()
    (tmp_path / "splits.yaml").write_text('"    ": test\n')
    (tmp_path / "splits.json").write_text(json.dumps({"    ": "test"}))
    for f in ("splits.yaml", "splits.json"):
        got = by_id(OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, split_map_file=f).load())
        assert [got[f"CXR{i}_IM-{i}"].split for i in (1, 2, 3)] == ["train", "test", "test"]
    (tmp_path / "bad.yaml").write_text('"    ": holdout\n')
    with pytest.raises(DataError, match=r"bad.yaml: split map values must be train, val or test"):
        OpenIReader(root=str(tmp_path), annotation_json=ann, reports_only=True, split_map_file="bad.yaml").load()


def test_16_bit_png_reads_like_its_8_bit_equivalent(tmp_path):
    from PIL import PngImagePlugin

    from cxr_relink.datamodules.datamodule import load_image
    from cxr_relink.datamodules.readers.common import grey_uint8, verify_image

    a8 = np.random.default_rng(0).integers(30, 200, (12, 12), dtype=np.uint8)  # not spanning 0..255
    Image.fromarray(a8).save(tmp_path / "a8.png")
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "a16.png")  # the same image, 16 bits: v*65535/255
    with Image.open(tmp_path / "a16.png") as im:
        assert im.mode == "I;16"
    # before: the 16-bit copy was min-max stretched to 0..255, the 8-bit one not
    np.testing.assert_array_equal(load_image(str(tmp_path / "a8.png"), "t"), a8)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a16.png"), "t"), a8)
    # 12-bit data declared by the PNG's sBIT chunk: scaled by 4095
    a12 = np.random.default_rng(1).integers(0, 4096, (12, 12)).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(a12).save(tmp_path / "a12.png", pnginfo=info)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a12.png"), "t"),
                                  np.floor(a12 * 255.0 / 4095 + 0.5).astype(np.uint8))
    # the same values without sBIT would be near black (<= 16 grey levels): refused, naming the file
    Image.fromarray(a12).save(tmp_path / "undeclared.png")
    with pytest.raises(ValueError, match=r"undeclared.png: 16-bit image with every value below 16384"):
        load_image(str(tmp_path / "undeclared.png"), "t")
    assert "16-bit image with every value below 16384" in (verify_image(str(tmp_path / "undeclared.png")) or "")
    with Image.open(tmp_path / "a16.png") as im:  # what Pillow < 10.3 opened 16-bit PNGs as
        im.load()
        as_i = im.convert("I")
        as_i.format = "PNG"
        np.testing.assert_array_equal(grey_uint8(as_i, "t"), a8)
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"f.tiff: .*mode F"):
        load_image(str(tmp_path / "f.tiff"), "t")
