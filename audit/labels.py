"""The 14 CheXpert labels, and pathology label groups for hard negatives (rows with identical mapped
14-label vectors).

The label names live here, in the audit library, so that ``audit`` stands alone (numpy, torch, scipy);
``datamodules.records`` re-exports them for the rest of the project."""

from __future__ import annotations

from typing import Any

import numpy as np

# The 14 CheXpert observations, in CheXpert's canonical order. Every label vector in this project
# (and every ``labels`` array the audit takes) is indexed by this tuple; readers map their columns
# *by name* onto it.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_LABELS = len(CHEXPERT_LABELS)

# How a 14-label vector with values {1, 0, -1, NaN} is mapped before "identical label
# vector" is decided for hard negatives.
#   blank_negative (default): NaN (not mentioned) -> 0, -1 kept as its own value.
#       Blank and explicit negative both mean "not positive"; keeping them apart would
#       split groups by whether the radiologist happened to write "no pneumothorax", i.e.
#       by report *style*, not pathology. An uncertain finding is a distinct clinical
#       statement, so it is not merged with positive or negative.
#   raw: the four values are all distinct (strictest; tiny groups on real cohorts).
#   positive_only: 1 -> 1, everything else -> 0.
#   uncertain_positive: 1 and -1 -> 1, everything else -> 0 (CheXpert "U-Ones").
LABEL_MAPPINGS = ("blank_negative", "raw", "positive_only", "uncertain_positive")


def label_groups(labels: Any, mapping: str = "blank_negative") -> "torch.Tensor":
    """Integer group per row: rows in one group have identical mapped label vectors."""
    import torch  # here: datamodules.records takes the label names from this module without torch

    if labels is None:
        raise ValueError("hard negatives need the 14 CheXpert labels per study, but labels is None")
    lab = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    if lab.ndim != 2 or lab.shape[1] != NUM_LABELS:
        raise ValueError(f"labels must have shape [n, {NUM_LABELS}], got {tuple(lab.shape)}")
    nan = torch.isnan(lab)
    if nan.all():
        raise ValueError("labels are missing (all blank/NaN): hard negatives need pathology labels")
    ok = nan | (lab == 1) | (lab == 0) | (lab == -1)
    if not ok.all():
        raise ValueError("label values must be 1, 0, -1 or NaN (blank)")
    if mapping == "blank_negative":
        m = torch.where(nan, torch.zeros_like(lab), lab)
    elif mapping == "raw":
        m = torch.where(nan, torch.full_like(lab, 2.0), lab)
    elif mapping == "positive_only":
        m = (lab == 1).float()
    elif mapping == "uncertain_positive":
        m = ((lab == 1) | (lab == -1)).float()
    else:
        raise ValueError(f"unknown label mapping {mapping!r}; expected one of {LABEL_MAPPINGS}")
    return torch.unique(m, dim=0, return_inverse=True)[1].long()


def has_labels(labels: Any) -> bool:
    """Whether any label is present (not NaN): audits defined by labels (hard negatives, the probe)
    are skipped, with the reason, on a split that has none."""
    return labels is not None and bool(np.isfinite(np.asarray(labels, dtype=np.float64)).any())
