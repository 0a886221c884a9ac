"""Open-I / IU X-ray (Indiana University chest X-ray collection), from its published layouts.

Two layouts, chosen by what is under `root`:
1. NLM's release (default): `ecgen-radiology/<n>.xml` (one `eCitation` per study) or the archive
   `NLMCXR_reports.tgz` itself (read member by member with tarfile; nothing is extracted). `root` may
   also point straight at the .tgz. Sections are `AbstractText[@Label]` (COMPARISON, INDICATION,
   FINDINGS, IMPRESSION); MeSH terms (`MeSH/major`, `MeSH/automatic`) go to extras; images are
   `parentImage[@id]` -> `<images_dir>/<id>.png` (NLMCXR_png release).
2. R2Gen-style `annotation.json` ({"train"|"val"|"test": [{id, report, image_path: [...], split}]},
   or a plain list of such items), with images at `<images_dir>/<image_path>`; the report is one
   string, split into findings/impression with the MIMIC-style section parser when it has headers,
   else all findings. Split names are mapped (validate/validation/valid -> val); an item's own
   `split` field wins over the key of the list it is in, so a key that is no split name is harmless
   when its items carry theirs; otherwise an unknown name raises unless `split_map` (or, for a key a
   Hydra override cannot write, a JSON/YAML `split_map_file`) maps it (e.g. {dev: val}); items
   without any split are hash-split by patient with a warning that counts them.

Open-I has no patient ids (one study per de-identified patient is the published unit) and no split:
patient_id = study id; splits by hash unless annotation.json gives them. It has no CheXpert labels
either: labels are blank unless `labels_csv` (e.g. CheXbert output) keyed by study id is given.
Views are unknown unless `projections_csv` is given: columns filename, projection = Frontal|Lateral
(the widely used indiana_projections.csv), or image_path, projection for annotation.json's paths.
Images of unknown view are kept by the view filter (keep_unknown_views=true), so lateral images
become audit queries; the reader says how many.

Images: without `images_dir` on disk the reader runs reports-only (every study without images,
for text-side stages such as experiment=text_adapt) and says so; the image-report datamodule then
refuses with an error naming the missing directory instead of building an empty loader.
`XXXX` (de-identification) is kept as written in the report; a section holding only `XXXX` marks or
its own heading ("FINDINGS:") is an empty section, and a report with no other text is empty
(`report_sections.section_text`; counted and skipped under the default on_error=skip).
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

from cxr_relink.datamodules.reader_utils import (
    FRONTAL_VIEWS,
    UNKNOWN_VIEW,
    CohortReader,
    DataError,
    InputIssues,
    apply_uncertainty,
    bad_utf8,
    check_label_join,
    clean,
    open_text,
    read_csv_rows,
)
from cxr_relink.datamodules.records import CHEXPERT_LABELS, NUM_LABELS, Study, labels_from_mapping
from cxr_relink.datamodules.report_sections import DEID_MARK, parse_report, section_text

log = logging.getLogger(__name__)

ARCHIVE_NAME = "NLMCXR_reports.tgz"
XML_DIR = "ecgen-radiology"
SECTION_LABELS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}
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


def _xml_error(where: str, reason: str) -> DataError:
    e = DataError(f"openi: {where}: {reason}")
    e.reason = reason  # what the skip log counts
    return e


def parse_ecgen_xml(stream: IO[bytes], where: str) -> dict:
    """One ecgen-radiology XML -> {id, sections, images, mesh_major, mesh_automatic}."""
    try:
        root = ET.parse(stream).getroot()
    except ET.ParseError as e:
        raise _xml_error(where, f"not well-formed XML (line {e.position[0]}, column {e.position[1]})") from None
    uid = root.find("uId")
    sid = uid.get("id") if uid is not None else None
    if not sid:
        raise _xml_error(where, "no uId/@id")
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
        images_dir: image directory (relative to root or absolute). Missing -> reports-only mode
            (logged; the image-report datamodule then refuses, naming the directory).
        image_ext: extension of XML-layout images (".png").
        labels_csv: optional CSV of CheXpert labels keyed by study id (column id/study_id/uid),
            label columns by CheXpert name; other columns are ignored.
        projections_csv: optional CSV giving each image's view: (filename, projection) as in
            indiana_projections.csv, or (image_path, projection) keyed by annotation.json's paths.
        split_map: {name in annotation.json: train|val|test} for split names the reader does not
            know (they raise otherwise, unless every item under them has its own `split`).
        split_map_file: the same map as a JSON or YAML file (relative to root or absolute), for keys
            a Hydra override cannot write (blank or odd characters); merged with split_map.
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
        split_map: dict[str, str] | None = None,
        split_map_file: str | None = None,
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
        self.split_map = {str(k): str(v) for k, v in dict(split_map or {}).items()}
        self.split_map_file = split_map_file
        bad = {k: v for k, v in self.split_map.items() if v not in SPLIT_NAMES.values()}
        if bad:
            raise ValueError(f"openi: split_map values must be train, val or test; got {bad}")

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

        def key_of(row: dict[str, str]) -> str | None:
            return next((row[c] for c in ID_COLUMNS if c in row), None)

        for line, row in read_csv_rows(path, (), issues, key=key_of, label_columns=True):
            key_col = next((c for c in ID_COLUMNS if c in row), None)
            if key_col is None:
                raise DataError(f"openi: {path}: no id column (one of {ID_COLUMNS})")
            ignored = sorted(set(row) - set(CHEXPERT_LABELS) - {key_col})
            if not out and ignored:
                log.info("openi: %s: ignoring non-label columns %s", path.name, ignored)
            sid = row[key_col].strip()
            where = f"{path.name} line {line}"
            if sid in out:
                issues.problem(where, "duplicate id in labels_csv", key=sid)
                continue
            try:
                out[sid] = labels_from_mapping({k: row[k] for k in CHEXPERT_LABELS}, where)
            except ValueError as e:
                issues.problem(where, f"bad label value ({e})", key=sid)
        return out

    def _load_projections(self) -> dict[str, str]:
        path = self._path(self.projections_csv)
        if path is None:
            return {}
        out = {}
        for line, row in read_csv_rows(path, ("projection",)):
            if "image_path" in row:  # keyed by annotation.json's image_path, exactly as written there
                names = [row["image_path"].strip()]
            elif "filename" in row:  # indiana_projections.csv: by file name and by image id
                fname = row["filename"].strip()
                names = [fname, fname.rsplit(".", 1)[0].removesuffix(".dcm")]
            else:
                raise DataError(f"openi: {path}: needs a filename or image_path column next to projection")
            proj = row["projection"].strip().upper()
            view = proj if proj in ("PA", "AP", "LATERAL", "FRONTAL") else ("LATERAL" if proj.startswith("LAT") else UNKNOWN_VIEW)
            for name in names:
                out[name] = view
        return out

    def _load_split_map_file(self) -> None:
        """Merge `split_map_file` (JSON or YAML {name: train|val|test}) into split_map."""
        path = self._path(self.split_map_file)
        if path is None:
            return
        if not path.is_file():
            raise FileNotFoundError(f"openi: split_map_file {path} does not exist")
        import yaml  # JSON is YAML; both keep quoted keys such as "    " exactly

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DataError(f"openi: {path}: not a readable JSON/YAML map ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise DataError(f"openi: {path}: expected a map of split name -> train|val|test")
        loaded = {str(k): str(v) for k, v in data.items()}
        bad = {k: v for k, v in loaded.items() if v not in SPLIT_NAMES.values()}
        if bad:
            raise DataError(f"openi: {path}: split map values must be train, val or test; got {bad}")
        clash = {k: (v, self.split_map[k]) for k, v in loaded.items() if k in self.split_map and self.split_map[k] != v}
        if clash:
            raise DataError(f"openi: {path} and split_map disagree on {clash}")
        self.split_map = {**loaded, **self.split_map}

    def _known_split(self, name: str) -> str | None:
        """A split name from annotation.json -> train|val|test (split_map first), None if unknown."""
        if name in self.split_map:
            return self.split_map[name]
        return SPLIT_NAMES.get(name.strip().lower())

    def _split_name(self, name: str, where: str) -> str:
        """`_known_split`, raising for an unknown name: guessing (e.g. re-splitting "validation" by
        hash) silently moved val studies into train."""
        ours = self._known_split(name)
        if ours is None:
            raise DataError(
                f"openi: {where}: unknown split name {name!r}; known names are {sorted(SPLIT_NAMES)}. "
                f"Map it with data.reader.split_map={{{name}: val}} (or train/test); for a key an override "
                "cannot write, data.reader.split_map_file=<JSON/YAML file of {name: split}>; or set "
                "data.reader.split_policy=hash to re-split every study by patient"
            )
        return ours

    def _annotation_records(self, ann: Path) -> Iterator[tuple[str, dict]]:
        """(where, record) per item of an R2Gen-style annotation.json (module docstring)."""
        with open_text(ann) as f:  # non-UTF-8 bytes are named per item below, not by a bare decode error
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"openi: {ann}: not valid JSON (line {e.lineno}, column {e.colno})") from None
        if isinstance(data, list):
            groups = [(None, data)]
        elif isinstance(data, dict):
            groups = list(data.items())
        else:
            raise DataError(f"openi: {ann}: expected an object of split -> list of studies, or a list of studies")
        use_names = self.split_policy in ("auto", "cohort")
        if use_names:
            self._load_split_map_file()
        n_missing = 0
        for split_key, items in groups:
            if not isinstance(items, list):
                raise DataError(f"openi: {ann} [{split_key}]: expected a list of studies")
            # A key that is no split name only matters for items without a split of their own.
            key_split = self._known_split(split_key) if split_key is not None and use_names else None
            if split_key is not None and use_names and key_split is None and items:
                log.info("openi: %s: key %r is not a split name; its items' own split fields are used",
                         ann.name, split_key)
            for i, it in enumerate(items):
                where = f"{ann.name} [{split_key}][{i}]" if split_key is not None else f"{ann.name} [{i}]"
                if not isinstance(it, dict) or it.get("id") in (None, ""):
                    raise DataError(f"openi: {where}: entry without an id")
                images = it.get("image_path")
                if images is None:
                    images = []
                elif isinstance(images, str):
                    images = [images]  # one path, not a sequence of characters
                elif not (isinstance(images, list) and all(isinstance(x, str) for x in images)):
                    raise DataError(f"openi: {where}: image_path must be a path or a list of paths, "
                                    f"got {type(images).__name__}")
                split = None
                if use_names:
                    own = it.get("split")
                    if own not in (None, ""):
                        split = self._split_name(str(own), where)
                    elif split_key is not None:
                        split = self._split_name(split_key, where)  # raises for a key that is no split name
                    if key_split is not None and split != key_split:
                        raise DataError(f"openi: {where}: split {own!r} contradicts the list it is in ({split_key!r})")
                    n_missing += split is None
                report = it.get("report")
                if report is not None and not isinstance(report, str):
                    raise DataError(f"openi: {where}: report must be a string, got {type(report).__name__}")
                yield where, {"id": str(it["id"]), "report": report or "", "images": images, "split": split,
                              "bad_utf8": bad_utf8(report, *images)}
        if n_missing:
            log.warning("openi: %s: %d studies have no split; split by patient hash (split_fractions=%s)",
                        ann.name, n_missing, list(self.split_fractions))

    def _records(self, issues: InputIssues) -> Iterator[tuple[str, dict | None]]:
        """(where, {id, sections|report, images, split, mesh...}) per study from either layout;
        None for a study file that could not be parsed (already reported to `issues`)."""
        ann = self._path(self.annotation_json)
        if ann is not None:
            yield from self._annotation_records(ann)
            return
        for where, stream in _xml_sources(self.root):
            try:
                yield where, parse_ecgen_xml(stream, where)
            except DataError as e:  # one bad file is one bad study: on_error decides
                issues.problem(where, getattr(e, "reason", "unreadable XML"))
                yield where, None

    def _read(self, issues: InputIssues) -> tuple[list[Study], int]:
        labels = self._load_labels(issues)
        projections = self._load_projections()
        img_dir = self._path(self.images_dir)
        reports_only = self.reports_only or img_dir is None or not img_dir.is_dir()
        if self.reports_only:
            self.no_images_reason = "reports_only=true"
        elif reports_only:
            self.no_images_reason = f"no image directory {img_dir} (data.reader.images_dir)"
            log.warning("openi: %s: reports only (studies have no images; text-side stages only)",
                        self.no_images_reason)
        from_xml = self.annotation_json is None
        studies: list[Study] = []
        seen: dict[str, str] = {}
        kept: set[str] = set()
        total = 0
        n_no_view = n_no_refs = 0
        for where, rec in self._records(issues):
            total += 1
            if rec is None:
                continue
            sid = rec["id"]
            if sid in seen:
                # Neither copy can be trusted to be the right one: drop both, and count both.
                first_kept = sid in kept and sid not in issues.skipped
                issues.problem(where, f"duplicate study id (first in {seen[sid]})", key=sid, records=1 + first_kept)
                continue
            seen[sid] = where
            if sid in issues.skipped:
                continue
            if rec.get("bad_utf8"):
                issues.problem(where, "not valid UTF-8", key=sid)
                continue
            if from_xml:
                sections = rec["sections"]
                # The report keeps every section as written (XXXX included); a section holding only
                # XXXX marks or its own heading is empty for the sections and the emptiness test.
                text = {k: section_text(v, heading=k) for k, v in sections.items()}
                findings, impression = text.get("FINDINGS", ""), text.get("IMPRESSION", "")
                report = report_from_sections(sections)
                empty_why = None if any(text.values()) else (
                    "empty report (de-identification marks only)" if DEID_MARK.search(report)
                    else "empty report (section headers only)")
            else:
                report = rec["report"]
                parsed = parse_report(report)
                has_headers = any(n in ("findings", "impression") for n, _ in parsed.sections)
                findings, impression = (parsed.findings, parsed.impression) if has_headers else (clean(report), "")
                empty_why = None if parsed.has_text else (
                    "empty report (de-identification marks only)" if parsed.deid_only
                    else "empty report (section headers only)")
            if not clean(report):
                issues.problem(where, "empty report", key=sid)
                continue
            if empty_why:
                issues.problem(where, empty_why, key=sid)
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
                    view = next((projections[k] for k in (image_id, Path(image_id).name, Path(image_id).stem)
                                 if k in projections), UNKNOWN_VIEW)
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
                    if image_ids:
                        n_no_view += 1
                    else:
                        n_no_refs += 1
                    continue
            lab = labels.get(sid)
            lab = np.full(NUM_LABELS, np.nan, dtype=np.float32) if lab is None else lab
            kept.add(sid)
            studies.append(
                Study(
                    study_id=sid,
                    patient_id=sid,
                    images=paths,
                    report=report,
                    findings=findings,
                    impression=impression,
                    labels=apply_uncertainty(lab, self.uncertainty),
                    split=self.resolve_split(rec.get("split"), sid),
                    source=self.source,
                    views=views,
                    extras={
                        "image_ids": list(image_ids),
                        "mesh_major": rec.get("mesh_major", []),
                        "mesh_automatic": rec.get("mesh_automatic", []),
                    },
                )
            )
        if self.labels_csv:
            # Against every study in the files (before view and image filters): ids of another
            # scheme would otherwise leave every label blank without a word.
            check_label_join("openi", self._path(self.labels_csv), list(labels), list(seen))
        else:
            log.info("openi: no labels_csv: CheXpert labels are blank (Open-I ships none); "
                     "label-based audits cannot run")
        if n_no_refs:
            log.info("openi: %d studies list no image (%s); dropped", n_no_refs,
                     "no parentImage" if from_xml else "empty image_path")
        if n_no_view:
            log.info("openi: %d studies have no image of a view in %s; dropped", n_no_view, self.views)
        unknown = [st for st in studies if UNKNOWN_VIEW in st.views]
        if unknown and self.views is not None:
            source = "annotation.json records no views" if not from_xml else "no projections_csv"
            log.warning(
                "openi: %d images of %d studies have no known view (%s): kept, so lateral images become audit "
                "queries; give projections_csv (columns %s, projection) to filter them",
                sum(v == UNKNOWN_VIEW for st in unknown for v in st.views), len(unknown), source,
                "filename" if from_xml else "image_path",
            )
        return studies, total
