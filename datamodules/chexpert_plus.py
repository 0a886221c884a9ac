"""CheXpert Plus from its official layout, unchanged.

Expected under `root`:
    df_chexpert_plus_240401.csv     one row per image: path_to_image, frontal_lateral (Frontal|Lateral),
                                    ap_pa (AP|PA|LL|blank), deid_patient_id, report, section_findings,
                                    section_impression, ..., split (train|valid)
    chexbert_labels/impression_fixed.json   CheXbert labels, JSON lines keyed by path_to_image
    chexbert_labels/findings_fixed.json     (14 CheXpert names; 1, 0, -1, null)
    <path_to_image>                 the images: the path as written (train/patientN/studyM/viewK_frontal.jpg),
                                    or the PNG release's PNG/<same path>.png, tried in that order.
A study is the directory of its images (train/patient00001/study1). The label file is chosen with
`label_file` (null: blank labels); labels are joined on path_to_image and mapped by name.
CheXpert Plus has no test split: use split_policy=hash for patient-level splits, or
split_policy=test to evaluate on the whole cohort as an external test set.
Reports may exceed csv's default field limit (131,072 characters); the reader raises it
(reader_utils.CSV_FIELD_LIMIT). The CSV next to a `.gz` copy of itself is refused (they may differ).
A label file none of whose path_to_image keys is in the CSV is refused; partial matches are counted.
Rows of one study must agree: its images' labels (where the label file has them), split and
deid_patient_id; a patient directory must carry one id (a blank id reads as the directory name).
Section columns (or report sections) holding only `___` marks are empty.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from cxr_relink.datamodules.reader_utils import (
    FRONTAL_VIEWS,
    UNKNOWN_VIEW,
    CohortReader,
    DataError,
    InputIssues,
    apply_uncertainty,
    bad_utf8,
    check_label_join,
    check_label_names,
    clean,
    find_file,
    open_text,
    read_csv_rows,
)
from cxr_relink.datamodules.records import CHEXPERT_LABELS, NUM_LABELS, Study, labels_from_mapping
from cxr_relink.datamodules.report_sections import parse_report, section_text

log = logging.getLogger(__name__)

CSV_NAME = "df_chexpert_plus_240401.csv"
SPLIT_NAMES = {"train": "train", "valid": "val", "val": "val", "validate": "val", "test": "test"}
REQUIRED = ("path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id", "report",
            "section_findings", "section_impression")


def _study_of_row(row: dict[str, str]) -> str | None:
    """The study (directory of the image) a CSV row belongs to, for dropping it with a bad row."""
    rel = (row.get("path_to_image") or "").strip()
    return str(PurePosixPath(rel).parent) if rel else None


def view_of(frontal_lateral: str, ap_pa: str) -> str:
    fl, ap = frontal_lateral.strip().upper(), ap_pa.strip().upper()
    if fl == "LATERAL":
        return "LATERAL"
    if fl == "FRONTAL":
        return ap if ap in ("AP", "PA") else "FRONTAL"
    return ap or UNKNOWN_VIEW


class CheXpertPlusReader(CohortReader):
    """Reads CheXpert Plus into Study records (see module docstring for the layout).

    Args (beyond CohortReader's):
        csv: the main CSV, relative to root (`.gz` also accepted).
        label_file: CheXbert JSONL relative to root, or null for blank labels.
        image_root: where path_to_image is resolved (default: root).
    """

    cohort = "chexpert_plus"

    def __init__(
        self,
        root: str,
        csv: str = CSV_NAME,
        label_file: str | None = "chexbert_labels/impression_fixed.json",
        image_root: str | None = None,
        views: Sequence[str] | None = FRONTAL_VIEWS,
        **kwargs,
    ) -> None:
        super().__init__(root, views=views, **kwargs)
        self.csv = csv
        self.label_file = label_file
        self.image_root = Path(os.path.expanduser(str(image_root))) if image_root else self.root

    def _labels(self, issues: InputIssues) -> dict[str, np.ndarray]:
        if not self.label_file:
            return {}
        path = self.root / self.label_file
        if not path.is_file():
            raise FileNotFoundError(f"chexpert_plus: label file {path} does not exist (label_file=null for none)")
        out: dict[str, np.ndarray] = {}
        with open_text(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.name} line {n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"chexpert_plus: {where}: not valid JSON") from None
                if not isinstance(rec, dict):
                    raise DataError(f"chexpert_plus: {where}: expected a JSON object per line")
                key = rec.get("path_to_image")
                if not key or not isinstance(key, str):
                    raise DataError(f"chexpert_plus: {where}: no path_to_image")
                # Every record must name all 14 labels: a renamed key would blank that label everywhere.
                check_label_names(list(rec), f"chexpert_plus: {where}")
                if bad_utf8(line):
                    issues.problem(where, "not valid UTF-8", key=str(PurePosixPath(key).parent))
                    continue
                if key in out:
                    issues.problem(where, "duplicate path_to_image in label file", key=str(PurePosixPath(key).parent))
                    continue
                try:
                    out[key] = labels_from_mapping({k: rec[k] for k in CHEXPERT_LABELS if k in rec}, where)
                except ValueError as e:
                    issues.problem(where, f"bad label value ({e})", key=str(PurePosixPath(key).parent))
        return out

    def _image_path(self, rel: str) -> str:
        p = PurePosixPath(rel)
        cands = [self.image_root / p, self.image_root / "PNG" / p.with_suffix(".png"), self.image_root / p.with_suffix(".png")]
        for c in cands:
            if c.is_file():
                return str(c.resolve())
        return str(cands[0].resolve())

    def _read(self, issues: InputIssues) -> tuple[list[Study], int]:
        csv_path = find_file(self.root, self.csv, required=False)
        if csv_path is None:
            raise FileNotFoundError(f"chexpert_plus: expected {self.root / self.csv}")
        labels = self._labels(issues)

        rows_by_study: dict[str, list[tuple[int, dict[str, str]]]] = {}
        seen: dict[str, int] = {}
        for line, row in read_csv_rows(csv_path, REQUIRED, issues, key=_study_of_row):
            rel = row["path_to_image"].strip()
            study = str(PurePosixPath(rel).parent)
            if rel in seen:
                issues.problem(f"{csv_path.name} line {line}", f"duplicate path_to_image (first at line {seen[rel]})", key=study)
                continue
            seen[rel] = line
            rows_by_study.setdefault(study, []).append((line, row))

        if self.label_file:
            # Against every image row of the CSV (CheXbert keys are path_to_image).
            check_label_join("chexpert_plus", self.root / self.label_file, list(labels), list(seen), unit="image")

        # One patient, one id: a blank deid_patient_id falls back to the patient directory's name, so a
        # directory whose studies carry two ids (one written, one blank in another form) is refused.
        ids_of_dir: dict[str, dict[str, int]] = {}
        for study, rows in rows_by_study.items():
            line, first = rows[0]
            ids_of_dir.setdefault(str(PurePosixPath(study).parent), {}).setdefault(
                first["deid_patient_id"].strip() or PurePosixPath(study).parent.name, line)
        for pdir, ids in ids_of_dir.items():
            if len(ids) > 1:
                raise DataError(f"chexpert_plus: {csv_path.name} line {max(ids.values())}: patient directory {pdir} holds "
                                f"studies under patient ids {sorted(ids)} (a blank deid_patient_id reads as the directory "
                                "name): one patient must have one id in every row")

        studies: list[Study] = []
        n_no_view = n_no_label = 0
        for study, rows in rows_by_study.items():
            if study in issues.skipped:
                continue
            first_line, first = rows[0]
            where = f"{csv_path.name} line {first_line}"
            patient = first["deid_patient_id"].strip() or PurePosixPath(study).parent.name
            if any(r["deid_patient_id"].strip() != first["deid_patient_id"].strip() for _, r in rows):
                issues.problem(where, "images of one study under different deid_patient_id", key=study)
                continue
            split_of = [(ln, r.get("split", "").strip()) for ln, r in rows]
            other = next(((ln, sp) for ln, sp in split_of if sp != split_of[0][1]), None)
            if other:
                issues.problem(f"{csv_path.name} line {other[0]}", f"study {study} has split {other[1]!r} but line "
                               f"{first_line} gives it {split_of[0][1]!r} (one study, one split)", key=study)
                continue
            # Report and sections are per study; every image row repeats them.
            report = first["report"]
            # A section column of only "___" marks is an empty section.
            findings, impression = section_text(first["section_findings"]), section_text(first["section_impression"])
            if not clean(report) and not clean(first["section_findings"]) and not clean(first["section_impression"]):
                issues.problem(where, "empty report", key=study)
                continue
            used_fallback = False
            if not findings and not impression:
                parsed = parse_report(report)
                if not parsed.has_text:
                    marks = parsed.deid_only or not clean(report)  # only the section columns held text: marks
                    why = "de-identification marks only" if marks else "section headers only"
                    issues.problem(where, f"empty report ({why})", key=study)
                    continue
                findings, impression, used_fallback = parsed.findings, parsed.impression, parsed.used_fallback
                if not findings and not impression:
                    issues.problem(where, "section-less report", key=study)
                    continue
            kept = [(ln, r, view_of(r["frontal_lateral"], r["ap_pa"])) for ln, r in rows]
            kept = [k for k in kept if self.keep_view(k[2])]
            if not kept and not self.reports_only:
                n_no_view += 1
                continue
            paths, bad = [], None
            for ln, r, _ in ([] if self.reports_only else kept):
                p = self._image_path(r["path_to_image"].strip())
                why = self.image_problem(p)
                if why:
                    bad = (f"{csv_path.name} line {ln}: {p}", why)
                    break
                paths.append(p)
            if bad:
                issues.problem(bad[0], bad[1], key=study)
                continue
            # CheXbert labels are per report: every image of the study that has a row must give the same.
            labelled = [(r["path_to_image"].strip(), labels[r["path_to_image"].strip()]) for _, r in rows
                        if r["path_to_image"].strip() in labels]
            lab = labelled[0][1] if labelled else None
            odd = next((p for p, v in labelled[1:] if not np.array_equal(v, lab, equal_nan=True)), None)
            if odd is not None:
                issues.problem(f"{PurePosixPath(self.label_file).name}", f"the images of study {study} have different "
                               f"labels ({labelled[0][0]} vs {odd}); one report, one label vector", key=study)
                continue
            if lab is None:
                n_no_label += 1
                lab = np.full(NUM_LABELS, np.nan, dtype=np.float32)
            split = SPLIT_NAMES.get(first.get("split", "").strip().lower()) if first.get("split") else None
            if first.get("split") and split is None:
                raise DataError(f"chexpert_plus: {where}: unknown split value {first['split']!r}")
            studies.append(
                Study(
                    study_id=study,
                    patient_id=patient,
                    images=paths,
                    report=report,
                    findings=findings,
                    impression=impression,
                    labels=apply_uncertainty(lab, self.uncertainty),
                    split=self.resolve_split(split, patient),
                    source=self.source,
                    views=[] if self.reports_only else [v for _, _, v in kept],
                    extras={"paths_to_image": [r["path_to_image"].strip() for _, r, _ in kept],
                            "sections_fallback": used_fallback},
                )
            )
        if n_no_view:
            log.info("chexpert_plus: %d studies have no image with a view in %s; dropped", n_no_view, self.views)
        if n_no_label and self.label_file:
            log.info("chexpert_plus: %d studies have no row in %s; labels blank", n_no_label, self.label_file)
        return studies, len(rows_by_study)
