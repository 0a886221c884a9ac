"""Open-I / IU X-ray (Indiana University chest X-ray collection), from its published layouts.

Two layouts, chosen by what is under `root`:
1. NLM's release (default): `ecgen-radiology/<n>.xml` (one `eCitation` per study) or the archive
   `NLMCXR_reports.tgz` itself (read member by member with tarfile; nothing is extracted). `root` may
   also point straight at the .tgz. Sections are `AbstractText[@Label]` (COMPARISON, INDICATION,
   FINDINGS, IMPRESSION); MeSH terms (`MeSH/major`, `MeSH/automatic`) go to extras; images are
   `parentImage[@id]` -> `<images_dir>/<id>.png` (NLMCXR_png release).
2. R2Gen-style `annotation.json` ({"train"|"val"|"test": [{id, report, image_path: [...], split}]}),
   with images at `<images_dir>/<image_path>`; the report is one string, split into
   findings/impression with the MIMIC-style section parser when it has headers, else all findings.

Open-I has no patient ids (one study per de-identified patient is the published unit) and no split:
patient_id = study id; splits by hash unless annotation.json gives them. It has no CheXpert labels
either: labels are blank unless `labels_csv` (e.g. CheXbert output) keyed by study id is given.
Views are unknown unless `projections_csv` (columns uid, filename, projection = Frontal|Lateral, as
in the widely used indiana_projections.csv) is given; images of unknown view are kept by the view
filter (keep_unknown_views=true). Reports-only mode (no images; for text-side stages) when `images_dir` does not exist or
reports_only=true. `XXXX` (de-identification) is kept as written.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from datamodules.reader_utils import (
    FRONTAL_VIEWS,
    UNKNOWN_VIEW,
    CohortReader,
    DataError,
    InputIssues,
    apply_uncertainty,
    clean,
    read_csv_rows,
)
from datamodules.records import CHEXPERT_LABELS, NUM_LABELS, Study, labels_from_mapping
from datamodules.report_sections import parse_report

log = logging.getLogger(__name__)

ARCHIVE_NAME = "NLMCXR_reports.tgz"
XML_DIR = "ecgen-radiology"
SECTION_LABELS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "test": "test"}
ID_COLUMNS = ("id", "study_id", "uid", "uId")


def _xml_sources(root: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, byte stream) of each report XML: from a directory, or from the .tgz without extracting."""
    archive = root if root.is_file() else root / ARCHIVE_NAME
    xml_dir = root / XML_DIR
    if root.is_dir() and xml_dir.is_dir():
        for p in sorted(xml_dir.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
            with open(p, "rb") as f:
                yield str(p), f
    elif archive.is_file() and tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".xml"):
                    f = tf.extractfile(m)
                    if f is not None:
                        yield f"{archive}:{m.name}", f
    else:
        raise FileNotFoundError(
            f"openi: {root} holds neither {XML_DIR}/ nor {ARCHIVE_NAME} (or pass the .tgz itself, or annotation_json)"
        )


def report_from_sections(sections: dict[str, str]) -> str:
    """The full report as one string: 'COMPARISON: ... INDICATION: ... FINDINGS: ... IMPRESSION: ...'."""
    return "\n".join(f"{k}: {v}" for k, v in sections.items() if v)


def parse_ecgen_xml(stream: IO[bytes], where: str) -> dict:
    """One ecgen-radiology XML -> {id, sections, images, mesh_major, mesh_automatic}."""
    try:
        root = ET.parse(stream).getroot()
    except ET.ParseError as e:
        raise DataError(f"openi: {where}: not well-formed XML (line {e.position[0]}, column {e.position[1]})") from None
    uid = root.find("uId")
    sid = uid.get("id") if uid is not None else None
    if not sid:
        raise DataError(f"openi: {where}: no uId/@id")
    sections: dict[str, str] = {}
    for a in root.iter("AbstractText"):
        label = (a.get("Label") or "").strip().upper()
        if label:
            sections[label] = clean("".join(a.itertext()))
    return {
        "id": sid,
        "sections": sections,
        "images": [p.get("id") for p in root.findall("parentImage") if p.get("id")],
        "mesh_major": [clean(m.text) for m in root.findall("MeSH/major") if clean(m.text)],
        "mesh_automatic": [clean(m.text) for m in root.findall("MeSH/automatic") if clean(m.text)],
    }


class OpenIReader(CohortReader):
    """Reads Open-I reports (+ images where present) into Study records (module docstring).

    Args (beyond CohortReader's):
        annotation_json: R2Gen-style annotation file (relative to root or absolute); null = XML layout.
        images_dir: image directory (relative to root or absolute). Missing -> reports-only mode.
        image_ext: extension of XML-layout images (".png").
        labels_csv: optional CSV of CheXpert labels keyed by study id (column id/study_id/uid),
            label columns by CheXpert name; other columns are ignored.
        projections_csv: optional CSV (uid, filename, projection) giving each image's view.
        on_error: "skip" by default here: the published archive holds 28 reports (0.7%) with no
            section text at all, which are skipped as empty (within max_skip_fraction=0.01).
    """

    cohort = "openi"

    def __init__(
        self,
        root: str,
        annotation_json: str | None = None,
        images_dir: str | None = "images",
        image_ext: str = ".png",
        labels_csv: str | None = None,
        projections_csv: str | None = None,
        views: Sequence[str] | None = FRONTAL_VIEWS,
        on_error: str = "skip",
        keep_unknown_views: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(root, views=views, on_error=on_error, keep_unknown_views=keep_unknown_views, **kwargs)
        self.annotation_json = annotation_json
        self.images_dir = images_dir
        self.image_ext = image_ext
        self.labels_csv = labels_csv
        self.projections_csv = projections_csv

    def _path(self, p: str | None) -> Path | None:
        if not p:
            return None
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (self.root if self.root.is_dir() else self.root.parent) / q

    def _load_labels(self, issues: InputIssues) -> dict[str, np.ndarray]:
        path = self._path(self.labels_csv)
        if path is None:
            return {}
        out: dict[str, np.ndarray] = {}
        rows = read_csv_rows(path)
        for line, row in rows:
            key_col = next((c for c in ID_COLUMNS if c in row), None)
            if key_col is None:
                raise DataError(f"openi: {path}: no id column (one of {ID_COLUMNS})")
            ignored = sorted(set(row) - set(CHEXPERT_LABELS) - {key_col})
            if line == 2 and ignored:
                log.info("openi: %s: ignoring non-label columns %s", path.name, ignored)
            sid = row[key_col].strip()
            where = f"{path.name} line {line}"
            if sid in out:
                issues.problem(where, "duplicate id in labels_csv", key=sid)
                continue
            try:
                out[sid] = labels_from_mapping({k: row[k] for k in CHEXPERT_LABELS if k in row}, where)
            except ValueError as e:
                issues.problem(where, f"bad label value ({e})", key=sid)
        return out

    def _load_projections(self) -> dict[str, str]:
        path = self._path(self.projections_csv)
        if path is None:
            return {}
        out = {}
        for line, row in read_csv_rows(path, ("filename", "projection")):
            proj = row["projection"].strip().upper()
            view = proj if proj in ("PA", "AP", "LATERAL", "FRONTAL") else ("LATERAL" if proj.startswith("LAT") else UNKNOWN_VIEW)
            fname = row["filename"].strip()
            out[fname] = view
            out[fname.rsplit(".", 1)[0].removesuffix(".dcm")] = view  # by image id as well
        return out

    def _records(self) -> Iterator[tuple[str, dict]]:
        """(where, {id, sections|report, images, split, mesh...}) per study, from either layout."""
        ann = self._path(self.annotation_json)
        if ann is not None:
            with open(ann, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise DataError(f"openi: {ann}: expected an object of split -> list of studies")
            for split_key, items in data.items():
                for i, it in enumerate(items):
                    where = f"{ann.name} [{split_key}][{i}]"
                    if not isinstance(it, dict) or "id" not in it:
                        raise DataError(f"openi: {where}: entry without an id")
                    yield where, {
                        "id": str(it["id"]),
                        "report": it.get("report") or "",
                        "images": list(it.get("image_path") or []),
                        "split": it.get("split") or split_key,
                    }
        else:
            for where, stream in _xml_sources(self.root):
                yield where, parse_ecgen_xml(stream, where)

    def _read(self, issues: InputIssues) -> tuple[list[Study], int]:
        labels = self._load_labels(issues)
        projections = self._load_projections()
        img_dir = self._path(self.images_dir)
        reports_only = self.reports_only or img_dir is None or not img_dir.is_dir()
        if reports_only and not self.reports_only:
            log.info("openi: no image directory (%s); reports-only mode (studies have no images)", img_dir)
        from_xml = self.annotation_json is None
        studies: list[Study] = []
        seen: dict[str, str] = {}
        total = 0
        n_no_view = 0
        for where, rec in self._records():
            total += 1
            sid = rec["id"]
            if sid in seen:
                issues.problem(where, f"duplicate study id (first in {seen[sid]})", key=sid)
                continue
            seen[sid] = where
            if sid in issues.skipped:
                continue
            if from_xml:
                sections = rec["sections"]
                findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
                report = report_from_sections(sections)
            else:
                report = rec["report"]
                parsed = parse_report(report)
                has_headers = any(n in ("findings", "impression") for n, _ in parsed.sections)
                findings, impression = (parsed.findings, parsed.impression) if has_headers else (clean(report), "")
            if not clean(report):
                issues.problem(where, "empty report", key=sid)
                continue
            if not findings and not impression:
                # Published Open-I XMLs always have one of the two; keep such a study only if
                # the user asked for reports with other sections (it is still a valid report).
                issues.problem(where, "report without FINDINGS or IMPRESSION", key=sid)
                continue
            image_ids = rec["images"]
            paths, views, bad = [], [], None
            if not reports_only:
                for image_id in image_ids:
                    view = projections.get(Path(image_id).name, projections.get(Path(image_id).stem, UNKNOWN_VIEW))
                    if not self.keep_view(view):
                        continue
                    p = str((img_dir / (image_id + self.image_ext if from_xml else image_id)).resolve())
                    why = self.image_problem(p)
                    if why:
                        bad = (p, why)
                        break
                    paths.append(p)
                    views.append(view)
                if bad:
                    issues.problem(f"{where}: {bad[0]}", bad[1], key=sid)
                    continue
                if not paths:
                    n_no_view += 1
                    continue
            lab = labels.get(sid)
            lab = np.full(NUM_LABELS, np.nan, dtype=np.float32) if lab is None else lab
            split = rec.get("split")
            split = SPLIT_NAMES.get(str(split).lower()) if split else None
            studies.append(
                Study(
                    study_id=sid,
                    patient_id=sid,
                    images=paths,
                    report=report,
                    findings=findings,
                    impression=impression,
                    labels=apply_uncertainty(lab, self.uncertainty),
                    split=self.resolve_split(split, sid),
                    source=self.source,
                    views=views,
                    extras={
                        "image_ids": list(image_ids),
                        "mesh_major": rec.get("mesh_major", []),
                        "mesh_automatic": rec.get("mesh_automatic", []),
                    },
                )
            )
        if labels:
            missing = sum(1 for st in studies if st.study_id not in labels)
            if missing:
                log.info("openi: %d studies have no row in labels_csv; labels blank", missing)
        if n_no_view:
            log.info("openi: %d studies have no image of a view in %s; dropped", n_no_view, self.views)
        unknown = sum(v == UNKNOWN_VIEW for st in studies for v in st.views)
        if unknown and self.views is not None:
            log.warning("openi: %d images have no known view (no projections_csv); kept (keep_unknown_views)", unknown)
        return studies, total
