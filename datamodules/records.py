"""The Study record: the one schema every cohort reader yields and everything downstream reads.

Ground truth for retrieval is the study: every image of a study has that study's report as
its one true target. Splits are by patient, never by study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

# The 14 CheXpert observations, in CheXpert's canonical order: defined by the audit library (which
# stands alone), re-exported here for the rest of the project. Every label vector in this project is
# indexed by this tuple; readers map their columns *by name* onto it.
from cxr_relink.audit.labels import CHEXPERT_LABELS, NUM_LABELS

__all__ = ["CHEXPERT_LABELS", "NUM_LABELS", "LABEL_INDEX", "VALID_LABEL_VALUES", "SPLITS", "TEXT_FIELDS", "Study",
           "validate_labels", "labels_from_mapping"]

LABEL_INDEX = {name: i for i, name in enumerate(CHEXPERT_LABELS)}

# Label values: 1 positive, 0 negative (negated mention), -1 uncertain (hedged), NaN blank.
VALID_LABEL_VALUES = (1.0, 0.0, -1.0)

SPLITS = ("train", "val", "test")

# Which report text a model sees (data.text_field); Study.text resolves it.
TEXT_FIELDS = ("report", "findings", "impression", "findings_impression")

ImageRef = Union[str, np.ndarray]


@dataclass
class Study:
    """One radiology study: one report, one or more images (views).

    `images` holds file paths (real cohorts) or HxW uint8 arrays (the synthetic cohort);
    `views` names each image's view position (e.g. "PA", "AP", "LATERAL").
    `labels` is a float32 vector over CHEXPERT_LABELS with values in {1, 0, -1, NaN}.
    `extras` carries cohort-specific metadata (report variants, attributes, ...); it is
    never logged.
    """

    study_id: str
    patient_id: str
    # PHI never goes into a repr (debug logs, test failures, tracebacks): only ids, labels, split.
    images: list[ImageRef] = field(repr=False)
    report: str = field(repr=False)
    findings: str = field(repr=False)
    impression: str = field(repr=False)
    labels: np.ndarray
    split: str
    source: str
    views: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.labels = validate_labels(self.labels, where=f"study {self.study_id!r}")
        if self.split not in SPLITS:
            raise ValueError(f"study {self.study_id!r}: split {self.split!r} is not one of {SPLITS}")
        if self.views and len(self.views) != len(self.images):
            raise ValueError(
                f"study {self.study_id!r}: {len(self.views)} views for {len(self.images)} images"
            )

    def text(self, text_field: str = "report") -> str:
        """The report text a model sees under ``text_field`` (TEXT_FIELDS). Falls back to the full
        report when a section is empty. (The audit library reads report texts through this method,
        so it needs no import of this module.)"""
        if text_field == "report":
            return self.report
        if text_field == "findings":
            return self.findings or self.report
        if text_field == "impression":
            return self.impression or self.report
        if text_field == "findings_impression":
            joined = " ".join(t for t in (self.findings, self.impression) if t)
            return joined or self.report
        raise ValueError(f"text_field must be one of {TEXT_FIELDS}, got {text_field!r}")


def validate_labels(labels: Sequence[float] | np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(labels, dtype=np.float32)
    if arr.shape != (NUM_LABELS,):
        raise ValueError(f"{where}: labels must have shape ({NUM_LABELS},), got {arr.shape}")
    bad = [
        (CHEXPERT_LABELS[i], float(v))
        for i, v in enumerate(arr)
        if not (math.isnan(v) or float(v) in VALID_LABEL_VALUES)
    ]
    if bad:
        raise ValueError(f"{where}: label values must be 1, 0, -1 or blank (NaN); got {bad}")
    return arr


def labels_from_mapping(values: dict[str, Any], where: str) -> np.ndarray:
    """Build a label vector from a {CheXpert name: value} mapping, by name, never by position.

    Missing names and blank values ("" / None / NaN) become NaN; unknown names raise.
    """
    unknown = sorted(set(values) - set(CHEXPERT_LABELS))
    if unknown:
        raise ValueError(f"{where}: unknown label names {unknown}; expected names from {CHEXPERT_LABELS}")
    out = np.full(NUM_LABELS, np.nan, dtype=np.float32)
    for name, v in values.items():
        if v is None or (isinstance(v, str) and v.strip() == ""):
            continue
        try:
            fv = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {name!r} has value {v!r}; expected 1, 0, -1 or blank") from None
        if not math.isnan(fv):
            out[LABEL_INDEX[name]] = fv
    return validate_labels(out, where)
