"""Write Study records (the synthetic cohort's, in particular) in each real cohort's official layout.

    python -m cxr_relink.datamodules.exporters --format mimic_cxr --out DIR [--num-patients N] [--seed S]
    python -m cxr_relink.datamodules.exporters --format chexpert_plus --out DIR
    python -m cxr_relink.datamodules.exporters --format openi --out DIR

The readers (datamodules/{mimic_cxr,chexpert_plus,openi}.py) then read DIR unchanged, so the whole
real-cohort path (layout -> Study -> batches -> training/audit) is exercised without credentialed
data. Ids are renumbered into each cohort's id scheme; `export_ids.csv` (not part of any official
layout; the readers ignore it) maps the original study/patient ids to the exported ones.

Formats written:
- mimic_cxr: files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg, files/pXX/pSUBJECT/sSTUDY.txt (79-column
  wrapped, FINAL REPORT / EXAMINATION / INDICATION / TECHNIQUE / COMPARISON / FINDINGS / IMPRESSION),
  mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}.csv.gz (labels in alphabetical column order).
- chexpert_plus: df_chexpert_plus_240401.csv, chexbert_labels/{impression,findings}_fixed.json
  (JSON lines keyed by path_to_image), images at {train,valid,test}/patientNNNNN/studyK/viewJ_*.jpg.
- openi: ecgen-radiology/<n>.xml (eCitation), images/<parentImage id>.png, indiana_projections.csv,
  labels.csv (CheXbert-style, keyed by id) and an R2Gen-style annotation.json carrying the splits.
JPEG (MIMIC, CheXpert Plus) is written at quality 100 without chroma subsampling; it is still lossy
(pixel values move by a few levels). Open-I PNGs are lossless.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import logging
import shutil
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from cxr_relink.datamodules.reader_utils import FRONTAL_VIEWS, clean
from cxr_relink.datamodules.records import CHEXPERT_LABELS, Study
from cxr_relink.datamodules.report_sections import parse_report

log = logging.getLogger(__name__)

FORMATS = ("mimic_cxr", "chexpert_plus", "openi")
ID_MAP = "export_ids.csv"
MIMIC_PREFIX = "mimic-cxr-2.0.0"
MIMIC_META_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
CXP_COLUMNS = [
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
    "report", "section_narrative", "section_clinical_history", "section_history", "section_comparison",
    "section_technique", "section_procedure_comments", "section_findings", "section_impression",
    "section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race",
    "ethnicity", "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split",
]
# What each format writes at the top of DIR: the only things --overwrite removes.
OWNED = {
    "mimic_cxr": ["files"] + [f"{MIMIC_PREFIX}-{n}.csv.gz" for n in ("metadata", "split", "chexpert", "negbio")],
    "chexpert_plus": ["train", "valid", "test", "chexbert_labels", "df_chexpert_plus_240401.csv"],
    "openi": ["ecgen-radiology", "images", "indiana_projections.csv", "labels.csv", "annotation.json"],
}


# ---- helpers ------------------------------------------------------------------------------------
def image_array(ref) -> np.ndarray:
    """A Study image (HxW uint8 array or a file path) as an HxW uint8 array."""
    if isinstance(ref, np.ndarray):
        return np.ascontiguousarray(ref, dtype=np.uint8)
    with Image.open(ref) as im:
        return np.asarray(im.convert("L"))


def save_image(ref, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image_array(ref), mode="L")
    if fmt == "JPEG":
        im.save(path, format="JPEG", quality=100, subsampling=0)
    else:
        im.save(path, format="PNG")


def label_str(v: float) -> str:
    return "" if np.isnan(v) else f"{float(v):.1f}"


def label_json(v: float):
    return None if np.isnan(v) else float(v)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence], gz: bool = False) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    # mtime=0: the same studies give byte-identical files
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def is_frontal(view: str) -> bool:
    return view.upper() in FRONTAL_VIEWS + ("FRONTAL",)


def _by_patient(studies: Sequence[Study]) -> list[tuple[str, list[Study]]]:
    """Patients in first-appearance order, each with its studies in input order."""
    out: dict[str, list[Study]] = {}
    for st in studies:
        out.setdefault(st.patient_id, []).append(st)
    return list(out.items())


def _check_unique(studies: Sequence[Study]) -> None:
    ids = [st.study_id for st in studies]
    if len(set(ids)) != len(ids):
        raise ValueError("export: duplicate study ids in the input")


def _prepare_out(out: Path, fmt: str, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"export: {out} is not empty; pass overwrite=True (--overwrite) to replace an export")
        for name in OWNED[fmt] + [ID_MAP]:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def _write_id_map(out: Path, rows: list[list[str]]) -> None:
    write_csv(out / ID_MAP, ["original_study_id", "original_patient_id", "study_id", "patient_id"], rows)


def _sections(st: Study) -> tuple[str, str]:
    return clean(st.findings), clean(st.impression)


# ---- MIMIC-CXR ----------------------------------------------------------------------------------
def wrap(text: str) -> str:
    """MIMIC-style 79-column wrapping, every line indented by one space."""
    return textwrap.fill(text, width=79, initial_indent=" ", subsequent_indent=" ",
                         break_long_words=False, break_on_hyphens=False)


def mimic_report(st: Study) -> str:
    findings, impression = _sections(st)
    views = list(dict.fromkeys(v.upper() for v in st.views)) or ["PA"]
    exam = "CHEST (PORTABLE AP)" if views[0] == "AP" else ("CHEST (PA AND LAT)" if "LATERAL" in views else "CHEST (PA)")
    head = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {exam}", "", " INDICATION:  ___ with ___.", "",
            f" TECHNIQUE:  Chest {' and '.join(views)}.", "",
            " COMPARISON:  None.", ""]

    def section(name: str, body: str, same_line: bool) -> list[str]:
        if same_line:  # "IMPRESSION: text..." as MIMIC also writes it
            return [textwrap.fill(body, width=79, initial_indent=f" {name}: ", subsequent_indent=" ",
                                  break_long_words=False, break_on_hyphens=False), ""]
        return [f" {name}: ", "", wrap(body), ""]

    # Text starting like a header ("PA CXR: ...") on its own line would be split off by any MIMIC
    # parser; MIMIC also writes the text on the header's line, which keeps it in the section.
    for same_line in (False, True):
        parts = list(head)
        if findings:
            parts += section("FINDINGS", findings, same_line)
        if impression:
            parts += section("IMPRESSION", impression, same_line)
        text = "\n".join(parts).replace("\n\n", "\n \n")
        parsed = parse_report(text)
        if (parsed.findings, parsed.impression) == (findings, impression):
            return text
    raise ValueError(f"export mimic_cxr: study {st.study_id}: report would not read back with the same sections")


def _dicom_id(study_id: str, j: int) -> str:
    h = hashlib.sha256(f"{study_id}/{j}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def export_mimic_cxr(studies: Sequence[Study], out: str | Path, overwrite: bool = False) -> dict[str, str]:
    out = Path(out)
    _check_unique(studies)
    _prepare_out(out, "mimic_cxr", overwrite)
    meta, split_rows, label_rows, id_rows, ids = [], [], [], [], {}
    alpha = sorted(CHEXPERT_LABELS)
    order = {n: i for i, n in enumerate(CHEXPERT_LABELS)}
    n_study = 0
    for p, (patient, sts) in enumerate(_by_patient(studies)):
        subject = str(10_000_000 + p)
        for k, st in enumerate(sts):
            study = str(50_000_000 + n_study)
            n_study += 1
            rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            (out / rel).mkdir(parents=True, exist_ok=True)
            (out / f"{rel}.txt").write_text(mimic_report(st), encoding="utf-8")
            date = f"2180{1 + k // 28 % 12:02d}{1 + k % 28:02d}"
            for j, ref in enumerate(st.images):
                view = (st.views[j] if st.views else "PA").upper()
                dicom = _dicom_id(study, j)
                img = image_array(ref)
                save_image(img, out / rel / f"{dicom}.jpg", "JPEG")
                meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, img.shape[0], img.shape[1], date,
                             f"{120000 + j}.000", "Chest", "postero-anterior" if view == "PA" else view.lower(), "Erect"])
                split_rows.append([dicom, study, subject, "validate" if st.split == "val" else st.split])
            label_rows.append([subject, study] + [label_str(st.labels[order[n]]) for n in alpha])
            id_rows.append([st.study_id, st.patient_id, study, subject])
            ids[st.study_id] = study
    write_csv(out / f"{MIMIC_PREFIX}-metadata.csv.gz", MIMIC_META_COLUMNS, meta, gz=True)
    write_csv(out / f"{MIMIC_PREFIX}-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    for labeler in ("chexpert", "negbio"):
        write_csv(out / f"{MIMIC_PREFIX}-{labeler}.csv.gz", ["subject_id", "study_id"] + alpha, label_rows, gz=True)
    _write_id_map(out, id_rows)
    return ids


# ---- CheXpert Plus -------------------------------------------------------------------------------
CXP_SPLIT_DIR = {"train": "train", "val": "valid", "test": "test"}


def export_chexpert_plus(studies: Sequence[Study], out: str | Path, overwrite: bool = False) -> dict[str, str]:
    out = Path(out)
    _check_unique(studies)
    _prepare_out(out, "chexpert_plus", overwrite)
    rows, label_lines, id_rows, ids = [], [], [], {}
    for p, (patient, sts) in enumerate(_by_patient(studies)):
        pid = f"patient{p + 1:05d}"
        for k, st in enumerate(sts):
            split = CXP_SPLIT_DIR[st.split]
            study_rel = f"{split}/{pid}/study{k + 1}"
            findings, impression = _sections(st)
            labels = {n: label_json(v) for n, v in zip(CHEXPERT_LABELS, st.labels)}
            for j, ref in enumerate(st.images):
                view = (st.views[j] if st.views else "PA").upper()
                frontal = is_frontal(view)
                rel = f"{study_rel}/view{j + 1}_{'frontal' if frontal else 'lateral'}.jpg"
                save_image(ref, out / rel, "JPEG")
                row = dict.fromkeys(CXP_COLUMNS, "")
                row.update(
                    path_to_image=rel, path_to_dcm=rel.replace(".jpg", ".dcm"),
                    frontal_lateral="Frontal" if frontal else "Lateral",
                    ap_pa=view if view in ("AP", "PA") else ("LL" if not frontal else ""),
                    deid_patient_id=pid, patient_report_date_order=str(k + 1), report=st.report,
                    section_findings=findings, section_impression=impression, split=split,
                )
                rows.append([row[c] for c in CXP_COLUMNS])
                label_lines.append(json.dumps({"path_to_image": rel, **labels}))
            id_rows.append([st.study_id, st.patient_id, study_rel, pid])
            ids[st.study_id] = study_rel
    write_csv(out / "df_chexpert_plus_240401.csv", CXP_COLUMNS, rows)
    (out / "chexbert_labels").mkdir(exist_ok=True)
    for name in ("impression_fixed.json", "findings_fixed.json"):
        (out / "chexbert_labels" / name).write_text("".join(line + "\n" for line in label_lines), encoding="utf-8")
    _write_id_map(out, id_rows)
    return ids


# ---- Open-I --------------------------------------------------------------------------------------
def openi_xml(n: int, st: Study, image_ids: list[str]) -> bytes:
    findings, impression = _sections(st)
    root = ET.Element("eCitation")
    ET.SubElement(root, "meta", type="rr")
    ET.SubElement(root, "uId", id=f"CXR{n}")
    ET.SubElement(root, "pmcId", id=str(n))
    ET.SubElement(root, "IUXRId", id=str(n))
    ET.SubElement(root, "licenseType").text = "open-access"
    ET.SubElement(root, "ccLicense").text = "(synthetic export)"
    mc = ET.SubElement(root, "MedlineCitation", Owner="cxr-relink export", Status="synthetic")
    art = ET.SubElement(mc, "Article", PubModel="Electronic")
    ET.SubElement(art, "ArticleTitle").text = "Chest X-ray"
    ab = ET.SubElement(art, "Abstract")
    for label, text in (("COMPARISON", "None."), ("INDICATION", "XXXX."), ("FINDINGS", findings), ("IMPRESSION", impression)):
        ET.SubElement(ab, "AbstractText", Label=label).text = text or None
    mesh = ET.SubElement(root, "MeSH")
    positives = [name for name, v in zip(CHEXPERT_LABELS, st.labels) if v == 1 and name != "No Finding"]
    for term in st.extras.get("mesh_major") or positives or ["normal"]:
        ET.SubElement(mesh, "major").text = term
    for j, image_id in enumerate(image_ids):
        pi = ET.SubElement(root, "parentImage", id=image_id)
        ET.SubElement(pi, "figureId").text = f"F{j + 1}"
        ET.SubElement(pi, "caption").text = "Xray Chest"
        ET.SubElement(ET.SubElement(pi, "panel", type="single"), "url").text = f"/images/{image_id}.png"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def export_openi(studies: Sequence[Study], out: str | Path, overwrite: bool = False) -> dict[str, str]:
    out = Path(out)
    _check_unique(studies)
    _prepare_out(out, "openi", overwrite)
    (out / "ecgen-radiology").mkdir()
    (out / "images").mkdir()
    proj_rows, label_rows, id_rows, ids = [], [], [], {}
    annotation: dict[str, list] = {"train": [], "val": [], "test": []}
    for n, st in enumerate(studies, start=1):
        sid = f"CXR{n}"
        image_ids = [f"{sid}_1_IM-{n:04d}-{j + 1}001" for j in range(len(st.images))]
        for j, (ref, image_id) in enumerate(zip(st.images, image_ids)):
            save_image(ref, out / "images" / f"{image_id}.png", "PNG")
            view = (st.views[j] if st.views else "PA").upper()
            proj_rows.append([n, f"{image_id}.png", "Frontal" if is_frontal(view) else "Lateral"])
        (out / "ecgen-radiology" / f"{n}.xml").write_bytes(openi_xml(n, st, image_ids))
        label_rows.append([sid] + [label_str(v) for v in st.labels])
        findings, impression = _sections(st)
        report = "\n".join(f"{h}: {t}" for h, t in (("FINDINGS", findings), ("IMPRESSION", impression)) if t)
        annotation[st.split].append(
            {"id": sid, "report": report, "image_path": [f"{i}.png" for i in image_ids], "split": st.split}
        )
        id_rows.append([st.study_id, st.patient_id, sid, sid])
        ids[st.study_id] = sid
    write_csv(out / "indiana_projections.csv", ["uid", "filename", "projection"], proj_rows)
    write_csv(out / "labels.csv", ["id"] + list(CHEXPERT_LABELS), label_rows)
    (out / "annotation.json").write_text(json.dumps(annotation, indent=1), encoding="utf-8")
    _write_id_map(out, id_rows)
    return ids


EXPORTERS: dict[str, Callable[..., dict[str, str]]] = {
    "mimic_cxr": export_mimic_cxr,
    "chexpert_plus": export_chexpert_plus,
    "openi": export_openi,
}


def export(studies: Sequence[Study], fmt: str, out: str | Path, overwrite: bool = False) -> dict[str, str]:
    """Write `studies` in layout `fmt` under `out`; returns {original study id: exported study id}."""
    if fmt not in EXPORTERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return EXPORTERS[fmt](studies, out, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cxr_relink.datamodules.exporters",
        description="Write the synthetic cohort in a real cohort's official on-disk layout.",
    )
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    ap.add_argument("--num-patients", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--overwrite", action="store_true", help="replace a previous export of this format in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        ap.error(f"--out {out} is not empty; pass --overwrite to replace a previous export")
    from cxr_relink.datamodules.synthetic import SyntheticReader

    studies = SyntheticReader(num_patients=args.num_patients, seed=args.seed, image_size=args.image_size).load()
    ids = export(studies, args.format, out, overwrite=args.overwrite)
    log.info("wrote %d studies (%d images) as %s under %s", len(ids), sum(len(s.images) for s in studies),
             args.format, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
