"""MIMIC-CXR-JPG 2.x images + MIMIC-CXR free-text reports, from their official layouts, unchanged.

Expected under `root` (MIMIC-CXR-JPG; `.csv` or `.csv.gz`):
    mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...
    mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train|validate|test)
    mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 labels (alphabetical; 1, 0, -1, blank)
    mimic-cxr-2.0.0-negbio.csv.gz     same columns (labeler=negbio)
    files/p10/p10000032/s50414267/<dicom_id>.jpg
and the reports (MIMIC-CXR `mimic-cxr-reports.zip`, unzipped) under `reports_root` (default: root):
    files/p10/p10000032/s50414267.txt
Label columns are mapped by name, never by position. Studies absent from the label file get blank
(NaN) labels, as in the official release (a warning counts them, and label rows naming no study);
a label file none of whose study_ids is in the metadata is refused. Every metadata study must have a
row in the split file (one written in another id form, "s50414267" or "050414267", or from another
release is refused, naming an id in both forms; `split_missing=hash` hash-splits the studies it lacks,
logged with counts); split rows naming no study are counted in a warning; one study's rows must give
one split, and the split and label files' subject_id must be the metadata's. A `.csv` next to its `.csv.gz`
is refused (they may differ). Sections come from `report_sections.parse_report`; a report holding
only headers or `___` marks is empty.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr_relink.datamodules.reader_utils import (
    FRONTAL_VIEWS,
    UNKNOWN_VIEW,
    CohortReader,
    DataError,
    InputIssues,
    apply_uncertainty,
    check_label_join,
    clean,
    find_file,
    read_csv_rows,
)
from cxr_relink.datamodules.records import CHEXPERT_LABELS, NUM_LABELS, Study, labels_from_mapping
from cxr_relink.datamodules.report_sections import parse_report

log = logging.getLogger(__name__)

PREFIX = "mimic-cxr-2.0.0"
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}
LABELERS = ("chexpert", "negbio")
SPLIT_MISSING = ("raise", "hash")  # studies of the metadata without a split row: refused, or hash-split


def mimic_id(value: str) -> str:
    """A subject or study id as every MIMIC file must write it: the integer's digits, spaces around them
    stripped. The one normalisation, applied wherever an id is read (metadata, split, label files), so
    an id is the same key in every join; another form ("s50414267", "050414267") is no match, and the
    joins name it (never re-written silently: it may come from another release)."""
    return value.strip()


def _official(split: str) -> str:
    """Our split name as the official split file writes it (val -> validate)."""
    return {"val": "validate"}.get(split, split)


def _canonical(value: str) -> str:
    """An id without a directory-style letter prefix or leading zeros: only to explain a failed join."""
    return value.strip().lstrip("spSP").lstrip("0")


def check_subject(path: Path, line: int, study: str, subject: str, subject_of: dict[str, str]) -> None:
    """A file's subject_id for `study` must be the metadata's (same id, same form)."""
    want = subject_of.get(study)
    if want is not None and subject != want:
        raise DataError(f"mimic_cxr: {path.name} line {line}: study {study} has subject_id {subject!r}; the metadata "
                        f"gives {want!r} (ids must be written as the metadata writes them: another release or id form?)")


def study_dir(subject_id: str, study_id: str) -> str:
    """files/p10/p10000032/s50414267 (relative)."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


class MimicCXRReader(CohortReader):
    """Reads MIMIC-CXR-JPG + reports into Study records (see module docstring for the layout).

    Args (beyond CohortReader's):
        reports_root: where `files/pXX/pXXXXXXXX/sXXXXXXXX.txt` live (default: root).
        labeler: chexpert | negbio (which label CSV).
        fallback_last_paragraph: when a report has neither FINDINGS nor IMPRESSION, use its last
            paragraph as the impression (the official parser's rule); otherwise such a report is
            bad input ("section-less report").
        split_missing: raise (default) | hash. Under split_policy auto/cohort every metadata study must
            have a row in the split file: one that joins for no study or only some (another id form,
            another release) is refused naming the file, the count and an id in both forms; `hash`
            hash-splits those studies by patient instead (logged with the counts; auto only).
    """

    cohort = "mimic_cxr"

    def __init__(
        self,
        root: str,
        reports_root: str | None = None,
        labeler: str = "chexpert",
        fallback_last_paragraph: bool = True,
        views: Sequence[str] | None = FRONTAL_VIEWS,
        split_missing: str = "raise",
        **kwargs,
    ) -> None:
        super().__init__(root, views=views, **kwargs)
        if labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {LABELERS}, got {labeler!r}")
        if split_missing not in SPLIT_MISSING:
            raise ValueError(f"split_missing must be one of {SPLIT_MISSING}, got {split_missing!r}")
        if split_missing == "hash" and self.split_policy == "cohort":
            raise ValueError("split_missing=hash hash-splits studies the split file lacks; split_policy=cohort forbids "
                             "that: use split_policy=auto")
        self.split_missing = split_missing
        self.reports_root = Path(os.path.expanduser(str(reports_root))) if reports_root else self.root
        self.labeler = labeler
        self.fallback_last_paragraph = fallback_last_paragraph

    def _check_split_join(self, path: Path, study_split: dict[str, tuple[str, int]],
                          images: dict[str, list[tuple[str, str]]], skipped: set[str]) -> None:
        """Every metadata study must have a split row (else refused, naming an id in both forms, unless
        split_missing=hash); split rows naming no metadata study are counted in a warning."""
        have, want = set(study_split), set(images)
        # a study whose split row was bad input and skipped (on_error=skip) is dropped, not unsplit
        missing, stray = sorted(want - have - skipped), sorted(have - want)
        if stray:
            log.warning("mimic_cxr: %d of %d studies in %s match no study in the metadata (e.g. %s)",
                        len(stray), len(have), path.name, stray[:3])
        if not missing:
            return
        if self.split_missing == "hash":
            log.warning("mimic_cxr: %d of %d studies have no row in %s; split_missing=hash: they are hash-split by "
                        "patient (e.g. %s)", len(missing), len(want), path.name, missing[:3])
            return
        by_canon = {_canonical(s): s for s in stray}
        pair = next(((m, by_canon[_canonical(m)]) for m in missing if _canonical(m) in by_canon), None)
        if pair:
            example = f"metadata study_id {pair[0]!r} is written {pair[1]!r} there"
        else:
            example = (f"e.g. metadata study_id {missing[0]!r}; the file's study_ids look like "
                       f"{sorted(have)[:2] if have else 'nothing (no rows)'}")
        raise DataError(
            f"mimic_cxr: {path}: {len(missing)} of {len(want)} studies in the metadata have no row in the split file "
            f"({example}); expected the metadata's study ids (integers as in {PREFIX}-metadata, e.g. {missing[0]!r}) "
            "from the same release. Fix the file, or set split_missing=hash to hash-split those studies by patient")

    def _read(self, issues: InputIssues) -> tuple[list[Study], int]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"mimic_cxr: root {self.root} is not a directory")
        meta_path = find_file(self.root, f"{PREFIX}-metadata.csv")
        split_path = find_file(self.root, f"{PREFIX}-split.csv")
        label_path = find_file(self.root, f"{PREFIX}-{self.labeler}.csv", required=False)
        if label_path is None:
            log.warning("mimic_cxr: no %s label file under %s; labels are blank", self.labeler, self.root)

        # study -> (split, line); every image row of a study must give the same split (and subject)
        study_split: dict[str, tuple[str, int]] = {}
        split_subject: dict[str, tuple[str, int]] = {}
        for line, row in read_csv_rows(split_path, ("dicom_id", "study_id", "subject_id", "split"), issues, "study_id"):
            sp = SPLIT_NAMES.get(row["split"].strip())
            if sp is None:
                raise DataError(f"{split_path} line {line}: unknown split value {row['split']!r}")
            study = mimic_id(row["study_id"])
            split_subject.setdefault(study, (mimic_id(row["subject_id"]), line))
            prev = study_split.setdefault(study, (sp, line))
            if prev[0] != sp:
                issues.problem(f"{split_path.name} line {line}",
                               f"study {study} has split {row['split'].strip()!r} but line {prev[1]} gives it "
                               f"{_official(prev[0])!r} (one study, one split)", key=study)

        # study -> (subject, [(dicom, view)])
        images: dict[str, list[tuple[str, str]]] = defaultdict(list)
        subject_of: dict[str, str] = {}
        seen_dicoms: dict[str, int] = {}
        meta_columns = ("dicom_id", "subject_id", "study_id", "ViewPosition")
        for line, row in read_csv_rows(meta_path, meta_columns, issues, "study_id"):
            dicom, subject, study = row["dicom_id"].strip(), mimic_id(row["subject_id"]), mimic_id(row["study_id"])
            if dicom in seen_dicoms:
                raise DataError(f"{meta_path} line {line}: duplicate dicom_id {dicom} (first at line {seen_dicoms[dicom]})")
            seen_dicoms[dicom] = line
            if study in subject_of and subject_of[study] != subject:
                raise DataError(f"{meta_path} line {line}: study {study} listed under two subjects")
            subject_of[study] = subject
            images[study].append((dicom, row["ViewPosition"].strip().upper() or UNKNOWN_VIEW))

        labels: dict[str, np.ndarray] = {}
        if label_path is not None:
            rows = read_csv_rows(label_path, ("subject_id", "study_id"), issues, "study_id", label_columns=True)
            for line, row in rows:
                study = mimic_id(row["study_id"])
                where = f"{label_path.name} line {line}"
                check_subject(label_path, line, study, mimic_id(row["subject_id"]), subject_of)
                if study in labels:
                    issues.problem(where, "duplicate study_id in label file", key=study)
                    continue
                try:
                    labels[study] = labels_from_mapping({k: row.get(k) for k in CHEXPERT_LABELS if k in row}, where)
                except ValueError as e:
                    issues.problem(where, f"bad label value ({e})", key=study)

        if label_path is not None:
            # Against every study in the metadata (before the view filter).
            check_label_join("mimic_cxr", label_path, list(labels), list(images))

        for study, (subject, line) in split_subject.items():
            check_subject(split_path, line, study, subject, subject_of)
        if self.split_policy in ("auto", "cohort"):
            self._check_split_join(split_path, study_split, images, issues.skipped)

        studies: list[Study] = []
        n_no_view = 0
        hashed: Counter[str] = Counter()
        for study, imgs in images.items():
            if study in issues.skipped:
                continue
            subject = subject_of[study]
            rel = study_dir(subject, study)
            kept = [(d, v) for d, v in imgs if self.keep_view(v)]
            if not kept and not self.reports_only:
                n_no_view += 1
                continue
            report_path = self.reports_root / f"{rel}.txt"
            try:
                data = report_path.read_bytes()
            except FileNotFoundError:
                issues.problem(f"{report_path}", "missing report file", key=study)
                continue
            try:
                text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is no report text
            except UnicodeDecodeError as e:
                issues.problem(f"{report_path}", f"report file is not valid UTF-8 (byte {e.start})", key=study)
                continue
            parsed = parse_report(text)
            if not clean(text):
                issues.problem(f"{report_path}", "empty report", key=study)
                continue
            if not parsed.has_text:
                why = "de-identification marks only" if parsed.deid_only else "section headers only"
                issues.problem(f"{report_path}", f"empty report ({why})", key=study)
                continue
            if not self.fallback_last_paragraph and (parsed.used_fallback or not (parsed.findings or parsed.impression)):
                issues.problem(f"{report_path}", "section-less report (no FINDINGS or IMPRESSION)", key=study)
                continue
            paths: list[str] = []
            bad = None
            for dicom, _ in ([] if self.reports_only else kept):
                p = str((self.root / rel / f"{dicom}.jpg").resolve())
                why = self.image_problem(p)
                if why:
                    bad = (p, why)
                    break
                paths.append(p)
            if bad:
                issues.problem(bad[0], bad[1], key=study)
                continue
            lab = labels.get(study)
            if lab is None:
                lab = np.full(NUM_LABELS, np.nan, dtype=np.float32)
            official = study_split.get(study, (None, 0))[0]
            split = self.resolve_split(official, subject)
            if official is None:
                hashed[split] += 1
            studies.append(
                Study(
                    study_id=study,
                    patient_id=subject,
                    images=paths,
                    report=text,
                    findings=parsed.findings,
                    impression=parsed.impression,
                    labels=apply_uncertainty(lab, self.uncertainty),
                    split=split,
                    source=self.source,
                    views=[] if self.reports_only else [v for _, v in kept],
                    extras={
                        "dicom_ids": [d for d, _ in kept],
                        "sections": [name for name, _ in parsed.sections],
                        "sections_fallback": parsed.used_fallback,
                    },
                )
            )
        if hashed and self.split_policy in ("auto", "cohort"):
            log.warning("mimic_cxr: %d studies kept without a split row were hash-split by patient (split_missing=hash): "
                        "%s", sum(hashed.values()), ", ".join(f"{k}={hashed.get(k, 0)}" for k in ("train", "val", "test")))
        if n_no_view:
            log.info("mimic_cxr: %d studies have no image with a view in %s; dropped", n_no_view, self.views)
        return studies, len(images)
