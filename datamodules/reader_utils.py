"""What every real-cohort reader shares: view filter, uncertainty policy, splits, per-patient cap,
image checks (and the one rule for reading pixels of any bit depth), the label-file join check and
the bad-input policy.

A reader subclasses `CohortReader`, implements `_read(issues) -> list[Study]` for its own layout,
and gets the common options (and their validation) for free. `load()` is memoised: the datamodule
calls it from both `prepare_data` and `setup`, and reading 227k report files twice is wasteful.

Bad input (missing image, corrupt image, empty report, unknown label value, duplicate id) goes
through `InputIssues.problem(where, reason)`: with `on_error="raise"` (the default) it raises a
`DataError` naming the file/row; with `on_error="skip"` the study is dropped, the reason counted and
logged (counts and a few row names, never report text), and `load()` refuses to return when more
than `max_skip_fraction` of the studies were skipped.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import math
import os
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_relink.datamodules.records import CHEXPERT_LABELS, SPLITS, Study

log = logging.getLogger(__name__)

# Frontal projections. "FRONTAL" is what cohorts that only say frontal/lateral (Open-I projection
# files) map to; real MIMIC also has e.g. "AP AXIAL" / "PA LLD", which a user can list explicitly.
FRONTAL_VIEWS = ("PA", "AP")
UNKNOWN_VIEW = "UNKNOWN"
UNCERTAINTY_POLICIES = ("keep", "zeros", "ones", "ignore")
ON_ERROR = ("raise", "skip")
IMAGE_CHECKS = ("none", "exists", "verify")
SPLIT_POLICIES = ("auto", "cohort", "hash") + SPLITS


class DataError(ValueError):
    """Bad input in a cohort's files. The message names the file/row and the problem, never the text."""


# ---- small file helpers -------------------------------------------------------------------------
# Largest CSV field read (characters): far above any real report (MIMIC's longest is ~10k), low
# enough that an unclosed quote fails with the row named instead of reading a whole file into memory.
CSV_FIELD_LIMIT = 2**24


def find_file(root: Path, name: str, required: bool = True) -> Path | None:
    """`name` or `name.gz` under root (the official MIMIC CSVs ship gzipped; users often gunzip).

    Both present (e.g. after `gunzip -k`, or an edited copy next to the original) is refused: the
    two may differ, and picking one silently would read whichever the code happened to prefer."""
    plain, gz = root / name, root / f"{name}.gz"
    found = [c for c in (plain, gz) if c.is_file()]
    if len(found) == 2:
        raise DataError(f"found both {plain} and {gz}; they may differ, so neither is chosen: "
                        "remove or move the one not to be read")
    if found:
        return found[0]
    if required:
        raise FileNotFoundError(f"{root}: expected {name} or {name}.gz")
    return None


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text stream of a (gzipped) file. Bytes that are not UTF-8 come through as lone
    surrogates (surrogateescape) instead of a bare UnicodeDecodeError mid-file, so the caller can
    name the row that holds them (`bad_utf8`)."""
    # utf-8-sig: a byte-order mark before the header (a spreadsheet's "CSV UTF-8") is dropped, not
    # read into the first column's name.
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


_SURROGATE = re.compile("[\udc80-\udcff]")


def bad_utf8(*texts: str | None) -> bool:
    """Whether text read by `open_text` held bytes that are not UTF-8."""
    return any(t is not None and _SURROGATE.search(t) is not None for t in texts)


def read_text_file(path: Path) -> str:
    """A whole UTF-8 text file; non-UTF-8 bytes raise DataError naming the file and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def read_csv_rows(
    path: Path,
    required_columns: Sequence[str] = (),
    issues: "InputIssues | None" = None,
    key: str | Callable[[dict[str, str]], str | None] | None = None,
    label_columns: bool = False,
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row dict) for each data row of a (gzipped) CSV; checks the header first.

    `line` is the physical line where the row starts (what an editor or `sed -n` shows; quoted
    multi-line reports make it differ from the row count). A row with the wrong number of fields or
    with bytes that are not UTF-8 is bad input: it goes to `issues` (skipped when on_error=skip; the
    study named by its `key` column is then dropped, since a row lost silently would change it) or,
    without `issues`, raises DataError naming the file and line. `key` is a column name or a
    function of the (possibly short) row. `label_columns`: the header must name all 14 CheXpert labels.
    """
    # csv's default field limit (131,072 characters) is below the longest real reports; raise it
    # (process-wide, never lowered) to a bound that still stops an unclosed quote from swallowing
    # the rest of a multi-GB file into one field.
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (no header row)") from None
        except csv.Error as e:
            raise DataError(f"{path} line 1: not a readable CSV header ({e})") from None
        if bad_utf8(*header):
            raise DataError(f"{path} line 1: header is not valid UTF-8")
        missing = [c for c in required_columns if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {header}")
        if label_columns:
            check_label_names(header, str(path))
        key_of = key if callable(key) else (lambda row: row.get(key)) if key else (lambda row: None)
        end = reader.line_num
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # e.g. a field over the limit: name the row where it starts
                raise DataError(f"{path} line {end + 1}: {e} (an unclosed quote?)") from None
            start, end = end + 1, reader.line_num
            if not fields:  # blank line
                continue
            reason = None
            if len(fields) != len(header):
                reason = f"row has {len(fields)} fields, the header has {len(header)}"
            elif bad_utf8(*fields):
                reason = "not valid UTF-8"
            if reason:
                where = f"{path.name} line {start}"
                if issues is None:
                    raise DataError(f"{path} line {start}: {reason}")
                k = key_of(dict(zip(header, fields)))
                issues.problem(where, reason, key=k.strip() or None if isinstance(k, str) else None)
                continue
            yield start, dict(zip(header, fields))


def _label_norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def check_label_names(names: Sequence[str], where: str) -> None:
    """Every CheXpert label must be among `names` (CSV columns or JSON keys): a missing or renamed
    one would otherwise blank that label for every study without a word. Raises DataError naming the
    missing labels and any near-miss names found instead ("Pleural_Effusion")."""
    have = set(names)
    missing = [n for n in CHEXPERT_LABELS if n not in have]
    if missing:
        wanted = {_label_norm(n) for n in missing}
        near = sorted(n for n in have if _label_norm(n) in wanted)
        hint = f"; found similar names {near} (labels are matched by exact CheXpert name)" if near else ""
        raise DataError(f"{where}: missing label column(s)/key(s) {missing}{hint}; every CheXpert label must be "
                        "present (blank where unknown)")


def check_label_join(cohort: str, path: Path, label_ids: Sequence[str], unit_ids: Sequence[str],
                     unit: str = "study") -> None:
    """A label file joins the cohort on an id: ids that match nothing blank every label silently.

    None of `label_ids` among `unit_ids` (what the labels are keyed by: "study", or "image" for
    CheXbert's path_to_image) raises DataError naming the file with a few ids from both sides (the
    usual cause is another id scheme: "s50414267" for "50414267", another path prefix). Only some
    matching is logged as a warning with both counts. Ids are de-identified keys, never report text."""
    have, want = set(label_ids), set(unit_ids)
    units = {"study": "studies"}.get(unit, unit + "s")
    if not want:  # nothing read (every study skipped): the skip policy reports that
        return
    if not have & want:
        raise DataError(
            f"{cohort}: {path}: none of its {len(have)} label rows matches one of the {len(want)} {units} "
            f"(label ids e.g. {sorted(have)[:3]}; {unit} ids e.g. {sorted(want)[:3]}); the ids must be written "
            "exactly as the cohort writes them"
        )
    no_row, stray = len(want - have), sorted(have - want)
    if no_row or stray:
        log.warning("%s: %s: %d of %d %s have no label row (labels blank); %d of %d label rows match no %s%s",
                    cohort, path.name, no_row, len(want), units, len(stray), len(have), unit,
                    f" (e.g. {stray[:3]})" if stray else "")


def clean(text: str | None) -> str:
    """Collapse whitespace (wrapped lines, double spaces) to single spaces."""
    return " ".join((text or "").split())


# ---- splits, uncertainty, caps ------------------------------------------------------------------
def hash_split(patient_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> str:
    """Deterministic patient-level split: the same patient lands in the same split on any machine."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {list(fractions)}")
    h = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    acc = 0.0
    for name, f in zip(SPLITS, fractions):
        acc += f
        if u < acc:
            return name
    return SPLITS[-1]


def apply_uncertainty(labels: np.ndarray, policy: str) -> np.ndarray:
    """CheXpert's uncertainty policies: keep -1 (U-Ignore at loss time), U-Zeros, U-Ones, or blank it."""
    out = np.array(labels, dtype=np.float32, copy=True)
    unc = out == -1
    if policy == "keep":
        return out
    if policy == "zeros":
        out[unc] = 0.0
    elif policy == "ones":
        out[unc] = 1.0
    elif policy == "ignore":
        out[unc] = np.nan
    else:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_POLICIES}, got {policy!r}")
    return out


def cap_studies_per_patient(studies: list[Study], cap: int | None, seed: int = 0) -> list[Study]:
    """Keep at most `cap` studies per patient, chosen by a seeded hash (stable), in original order."""
    if not cap:
        return studies
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, st in enumerate(studies):
        by_patient[st.patient_id].append(i)
    keep: set[int] = set()
    capped = 0
    for idxs in by_patient.values():
        ranked = sorted(idxs, key=lambda i: hashlib.sha256(f"{seed}:{studies[i].study_id}".encode()).digest())
        keep.update(ranked[:cap])
        capped += len(idxs) > cap
    if capped:
        log.info("max_studies_per_patient=%d: dropped %d of %d studies (%d patients had more)",
                 cap, len(studies) - len(keep), len(studies), capped)
    return [st for i, st in enumerate(studies) if i in keep]


# ---- pixels: one rule for every bit depth ---------------------------------------------------------
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")
# A 16-bit image whose values all stay below this would use at most 64 of the 256 grey levels once
# scaled by 65535: 12- or 14-bit detector data in a 16-bit container that does not say so (a
# radiograph's brightest pixels, bone and markers, sit near the top of its real range).
UNDECLARED_LOW_BITS = 2**14


class BitDepthError(ValueError):
    """An image whose bit depth gives no defined 8-bit reading; `reason` is the message sans file."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.reason = reason


def png_significant_bits(path: str) -> int | None:
    """The grey-scale significant bits a PNG declares in its sBIT chunk (e.g. 12 for detector data
    stored in 16 bits), or None. PIL does not read sBIT, so the chunks before IDAT are walked here."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind == b"sBIT":
                    data = f.read(length)
                    return data[0] if data else None
                f.seek(length + 4, 1)  # chunk data + CRC
    except OSError:
        return None


def grey_uint8(im: Image.Image, source: str) -> np.ndarray:
    """An opened image as an HxW uint8 grey-scale array, by one rule for every bit depth: a value is
    scaled by the range of its format, v * 255 / (2**bits - 1), with bits = 8 for 8-bit images and
    16 for 16-bit ones (or the significant bits a PNG declares in sBIT). Never a per-image min-max
    stretch: that gave 16-bit copies of an image other values than its 8-bit copy, and made each
    image's grey levels depend on its own darkest and brightest pixel (docs/cohorts.md, "Pixels").

    Refused with BitDepthError (naming `source`): 32-bit integer and float images (no defined
    range), values above the declared bits, and 16-bit images with every value below 2**14 and no
    sBIT (12- or 14-bit data that would be scaled to a dark image of at most 64 grey levels)."""
    # PNG grey is at most 16 bits; Pillow before 10.3 opened 16-bit PNGs as mode "I" (Pillow PR 7849).
    if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.int64)
        sbit = png_significant_bits(im.filename) if im.format == "PNG" and getattr(im, "filename", "") else None
        bits = sbit if sbit and 1 <= sbit <= 16 else 16
        top = int(a.max()) if a.size else 0
        if top >= 2**bits:
            raise BitDepthError(source, f"value {top} above the {bits} significant bits its PNG sBIT declares")
        if sbit is None and top < UNDECLARED_LOW_BITS:
            raise BitDepthError(
                source,
                f"16-bit image with every value below {UNDECLARED_LOW_BITS} (max {top}) and no PNG sBIT chunk: "
                "12- or 14-bit data in a 16-bit container would read as a dark image of at most 64 grey levels. "
                "Declare its bits (PNG sBIT) or rescale it to the full 16-bit range (e.g. 12-bit values x 16)",
            )
        # Integer arithmetic, rounding half up: exact (v*257 -> v for 8-bit data stored in 16 bits).
        return ((a * 255 * 2 + (2**bits - 1)) // (2 * (2**bits - 1))).astype(np.uint8)
    if im.mode in ("I", "F"):
        raise BitDepthError(source, f"mode {im.mode} ({'32-bit integer' if im.mode == 'I' else 'floating-point'}) "
                                    "image has no defined grey range; store radiographs as 8- or 16-bit")
    return np.asarray(im.convert("L"))


# Samples per pixel of each PNG colour type (grey, RGB, palette, grey+alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_missing_rows(path: str) -> str | None:
    """Why a PNG's image data is shorter than its header says, or None. PIL zero-fills the rows of a
    zlib stream that ends early (a complete stream holding half the rows passes ``load()``), so the
    IDAT data is inflated here and its length compared with the size IHDR implies."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        ihdr, idat = None, []
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            data = f.read(length)
            f.read(4)  # CRC (PIL checks it)
            if kind == b"IHDR":
                ihdr = data
            elif kind == b"IDAT":
                idat.append(data)
            elif kind == b"IEND":
                break
    if ihdr is None or len(ihdr) < 13:
        return None
    width, height = int.from_bytes(ihdr[:4], "big"), int.from_bytes(ihdr[4:8], "big")
    bits, color, interlace = ihdr[8], ihdr[9], ihdr[12]
    if color not in _PNG_CHANNELS:
        return None
    bpp = bits * _PNG_CHANNELS[color]

    def size(w: int, h: int) -> int:  # one filter byte per row + the row's packed samples
        return h * (1 + (w * bpp + 7) // 8) if w > 0 and h > 0 else 0

    passes = [(width, height)] if not interlace else [
        (-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
    want = sum(size(w, h) for w, h in passes)
    z = zlib.decompressobj()
    got = 0
    for data in idat:
        got += len(z.decompress(data, max(want + 1 - got, 1)))
        if got > want:
            break
    if got >= want:
        return None
    if interlace:
        return f"truncated image data ({got} of {want} bytes of its interlaced rows; PIL would fill the rest with zeros)"
    row = 1 + (width * bpp + 7) // 8
    return f"truncated image data ({got // row} of {height} rows; PIL would fill the rest with zeros)"


def _bomb_reason(e: Exception) -> str:
    """PIL's decompression-bomb error as a short reason (its message names no file)."""
    nums = re.findall(r"\d+", str(e))
    size = f" ({nums[0]} pixels, above PIL's limit of {nums[1]})" if len(nums) >= 2 else ""
    return f"image too large to decode safely{size}"


def verify_image(path: str) -> str | None:
    """None if PIL decodes the whole file to a grey-scale array by `grey_uint8`'s rule, else a short
    reason (no pixel data is printed).

    A full decode (`load()`), not PIL's `verify()`: verify only checks a JPEG's headers, so a
    truncated file would pass here and crash training mid-epoch. A PNG's inflated data must also
    hold every row its header announces (`png_missing_rows`), and a header past PIL's
    decompression-bomb limit is a reason, not PIL's error naming no file."""
    try:
        with Image.open(path) as im:
            im.load()
            grey_uint8(im, path)
            fmt = im.format
        return png_missing_rows(path) if fmt == "PNG" else None
    except FileNotFoundError:
        return "missing image file"
    except Image.DecompressionBombError as e:
        return _bomb_reason(e)
    except BitDepthError as e:
        return e.reason
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"corrupt image file ({type(e).__name__})"


# ---- the bad-input policy -----------------------------------------------------------------------
class InputIssues:
    """Raise on bad input, or count and skip it (see module docstring)."""

    def __init__(self, cohort: str, on_error: str = "raise", max_skip_fraction: float = 0.01) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.cohort = cohort
        self.on_error = on_error
        self.max_skip_fraction = max_skip_fraction
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.skipped: set[str] = set()
        self.n_records = 0  # study records dropped (a duplicated id drops more than one record)

    def problem(self, where: str, reason: str, key: str | None = None, records: int | None = None) -> None:
        """Report bad input at `where` (file/row). Raises unless skipping; `key` = the study skipped.

        `records`: how many study records this drops (default: 1, or 0 when `key` was already
        skipped, so a second problem with one study does not count it twice)."""
        if self.on_error == "raise":
            raise DataError(
                f"{self.cohort}: {where}: {reason} (set on_error=skip to drop such studies, "
                f"up to max_skip_fraction={self.max_skip_fraction})"
            )
        k = key if key is not None else where
        if records is None:
            records = 0 if k in self.skipped else 1
        self.reasons[reason] += records
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)
        self.skipped.add(k)
        self.n_records += records

    def finish(self, total: int) -> None:
        """Log what was skipped; refuse when too much was."""
        n = self.n_records
        if not n:
            return
        for reason, c in self.reasons.most_common():
            if c:
                log.warning("%s: skipped %d x %s (e.g. %s)", self.cohort, c, reason, "; ".join(self.examples[reason]))
        frac = n / max(total, 1)
        log.warning("%s: skipped %d of %d studies (%.2f%%)", self.cohort, n, total, 100 * frac)
        if frac > self.max_skip_fraction:
            summary = ", ".join(f"{r}: {c}" for r, c in self.reasons.most_common())
            raise DataError(
                f"{self.cohort}: skipped {n} of {total} studies ({100 * frac:.2f}%), more than "
                f"max_skip_fraction={self.max_skip_fraction} ({summary}); fix the data or raise the limit"
            )


# ---- the base reader ----------------------------------------------------------------------------
class CohortReader:
    """Common options for every real-cohort reader.

    Args:
        root: the cohort's top directory (its official layout, unchanged).
        views: view positions to keep (default frontal: PA, AP); null keeps every image.
            Studies left with no image are dropped (counted in the log, not an error). Images whose
            view is blank in the files pass only with keep_unknown_views=true.
        uncertainty: what -1 (uncertain) labels become: keep | zeros | ones | ignore (NaN).
        split_policy: auto (the cohort's split if it has one, else hash) | cohort | hash |
            train | val | test (everything into that split, e.g. an external test cohort).
        split_fractions, split_seed: for hash splits (by patient, deterministic).
        max_studies_per_patient: cap (seeded choice), null for none.
        check_images: none | exists (stat each file; cheap) | verify (PIL-verify each file at load
            time; thorough but slow on 377k images). Corrupt images are otherwise caught when the
            datamodule decodes them, with an error naming the file.
        reports_only: keep studies without images (text-side stages); images lists are then empty.
        on_error, max_skip_fraction: the bad-input policy (module docstring).
    """

    cohort = "cohort"

    def __init__(
        self,
        root: str,
        views: Sequence[str] | None = FRONTAL_VIEWS,
        uncertainty: str = "keep",
        split_policy: str = "auto",
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        max_studies_per_patient: int | None = None,
        check_images: str = "exists",
        reports_only: bool = False,
        on_error: str = "raise",
        max_skip_fraction: float = 0.01,
        keep_unknown_views: bool = False,
        source: str | None = None,
    ) -> None:
        if root in (None, "", "???"):
            raise ValueError(f"{self.cohort}: set data.reader.root (data.root) to the cohort's directory")
        if uncertainty not in UNCERTAINTY_POLICIES:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_POLICIES}, got {uncertainty!r}")
        if split_policy not in SPLIT_POLICIES:
            raise ValueError(f"split_policy must be one of {SPLIT_POLICIES}, got {split_policy!r}")
        if check_images not in IMAGE_CHECKS:
            raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
        hash_split("x", split_fractions)  # validates the fractions now, not mid-read
        self.root = Path(os.path.expanduser(str(root)))
        self.views = None if views is None else tuple(str(v).upper() for v in views)
        self.uncertainty = uncertainty
        self.split_policy = split_policy
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.split_seed = split_seed
        self.max_studies_per_patient = max_studies_per_patient
        self.check_images = check_images
        self.reports_only = reports_only
        self.on_error = on_error
        self.max_skip_fraction = max_skip_fraction
        self.keep_unknown_views = keep_unknown_views
        self.source = source or self.cohort
        # Why studies have no images, when they have none (the datamodule names it when it refuses
        # to build an image loader from such a cohort); readers that detect it themselves set it.
        self.no_images_reason: str | None = "reports_only=true" if reports_only else None
        self._studies: list[Study] | None = None

    # subclasses implement this
    def _read(self, issues: InputIssues) -> tuple[list[Study], int]:
        """(studies read, number of studies seen incl. skipped ones)."""
        raise NotImplementedError

    def load(self) -> list[Study]:
        if self._studies is None:
            issues = InputIssues(self.cohort, self.on_error, self.max_skip_fraction)
            studies, total = self._read(issues)
            studies = [st for st in studies if st.study_id not in issues.skipped]
            issues.finish(total)
            studies = cap_studies_per_patient(studies, self.max_studies_per_patient, self.split_seed)
            self._studies = studies
            counts = Counter(st.split for st in studies)
            log.info(
                "%s: %d studies, %d images, %d patients (%s)",
                self.cohort,
                len(studies),
                sum(len(st.images) for st in studies),
                len({st.patient_id for st in studies}),
                ", ".join(f"{s}={counts.get(s, 0)}" for s in SPLITS),
            )
        return self._studies

    # helpers for subclasses ------------------------------------------------------------------
    def resolve_split(self, cohort_split: str | None, patient_id: str) -> str:
        """The study's split under `split_policy`; `cohort_split` is already mapped to our names."""
        p = self.split_policy
        if p in SPLITS:
            return p
        if p == "hash" or (p == "auto" and not cohort_split):
            return hash_split(patient_id, self.split_fractions, self.split_seed)
        if not cohort_split:
            raise DataError(f"{self.cohort}: split_policy=cohort but patient {patient_id} has no split in the files")
        return cohort_split

    def keep_view(self, view: str) -> bool:
        """Whether an image of `view` passes the view filter. A frontal image whose projection is not
        recorded ("FRONTAL") passes a filter naming PA or AP; an image of unknown view passes only
        when `keep_unknown_views` (Open-I, whose release records no views)."""
        if self.views is None:
            return True
        v = view.upper()
        if v == UNKNOWN_VIEW:
            return self.keep_unknown_views
        return v in self.views or (v == "FRONTAL" and any(f in self.views for f in FRONTAL_VIEWS))

    def image_problem(self, path: str) -> str | None:
        """None if the image passes `check_images`, else the reason."""
        if self.check_images == "none" or self.reports_only:
            return None
        if self.check_images == "exists":
            return None if os.path.isfile(path) else "missing image file"
        return verify_image(path)
