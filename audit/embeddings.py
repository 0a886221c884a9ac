"""Embeddings of one audited split: input validation, the EmbeddingSet, the validation-output
contract between the models and the audit callbacks, and the one report-text hash.

No Lightning here (the whole ``audit`` package runs without it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from audit.labels import NUM_LABELS

# What every embedding module's ``validation_step`` returns (DESIGN.md, "Contracts"): the audit
# callbacks collect these keys without knowing the model.
VALIDATION_KEYS = ("image_emb", "report_emb", "labels", "study_idx", "patient_idx", "index")


def as_embeddings(x: Any, name: str) -> torch.Tensor:
    """A finite, non-empty float32 [n, d] tensor, or a ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":  # strings, objects, booleans: a raw numpy error would name nothing
            raise ValueError(f"{name} has dtype {arr.dtype}; expected numbers (float embeddings)")
        t = torch.as_tensor(arr)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to audit; is the split empty?")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")
    if not t.is_floating_point():
        t = t.double()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN/inf values in {int(bad.sum())} rows (first rows: {rows})")
    if t.dtype == torch.float32:
        return t
    f = t.float()
    big = ~torch.isfinite(f).all(dim=1)  # finite in float64, beyond float32's range (|x| > 3.4e38)
    if big.any():
        rows = big.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has values beyond float32's range in {int(big.sum())} rows (first rows: {rows}); "
                         "rescale them")
    return f


def _row_scale(x: torch.Tensor, name: str) -> torch.Tensor:
    """Each row's largest |value|, [n, 1]; a row of zeros raises (it has no direction)."""
    scale = x.abs().amax(dim=1, keepdim=True)
    zero = scale.flatten() == 0
    if zero.any():
        rows = zero.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has {int(zero.sum())} all-zero rows (cannot be normalised): first rows {rows}")
    return scale


def reject_zero_rows(x: torch.Tensor, name: str) -> None:
    """Raise naming the all-zero rows of ``x`` (the probe rejects what re-linkage rejects)."""
    _row_scale(x, name)


def l2_normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit L2 norm, scale-safely: each row is first divided by its largest |value|,
    so 1e20 (whose square overflows float32) and 1e-25 (whose square underflows to 0) normalise like
    any other scale instead of becoming zeros or "all-zero" rows."""
    y = x / _row_scale(x, name)
    return y / y.norm(dim=1, keepdim=True)


def check_ids(x: Any, name: str, n: int) -> np.ndarray:
    """Study/patient ids: integers or strings, one per row, none blank (NaN, "")."""
    arr = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype.kind not in "iuUSf":
        raise ValueError(f"{name} has dtype {arr.dtype}; expected integers or fixed-width strings "
                         "(an .npz stores no pickled objects)")
    arr = arr.reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but image_emb has {n} rows")
    if arr.dtype.kind == "f":
        blank = np.isnan(arr)
    elif arr.dtype.kind in "US":
        blank = np.char.strip(arr) == ("" if arr.dtype.kind == "U" else b"")
    else:
        blank = np.zeros(n, bool)
    if blank.any():
        rows = np.flatnonzero(blank)
        # np.unique would merge every NaN id into one study (or patient): refuse instead.
        raise ValueError(f"{name} is blank (NaN or empty) in {rows.size} rows (first rows: {rows[:5].tolist()})")
    return arr


def check_labels_array(x: Any, name: str, n: int) -> np.ndarray:
    """Labels [n, 14] of numbers in {1, 0, -1, NaN}, or a ValueError naming ``name`` and the rows."""
    arr = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} has dtype {arr.dtype}; expected numbers 1, 0, -1 or NaN over {NUM_LABELS} labels")
    lab = arr.astype(np.float32)
    if lab.shape != (n, NUM_LABELS):
        raise ValueError(f"{name} must have shape [{n}, {NUM_LABELS}], got {lab.shape}")
    bad = ~(np.isnan(lab) | np.isin(lab, (1.0, 0.0, -1.0))).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has values other than 1, 0, -1, NaN in {rows.size} rows "
                         f"(first rows: {rows[:5].tolist()})")
    return lab


def _as_long(x: Any, name: str, n: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.reshape(-1).long().cpu()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t


def validation_outputs(image_emb: torch.Tensor, report_emb: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    """The ``validation_step`` output the audit callbacks collect: the batch's L2-normalised
    embeddings (detached) with its labels and ids (``VALIDATION_KEYS``)."""
    return {
        "image_emb": image_emb.detach(),
        "report_emb": report_emb.detach(),
        "labels": batch["labels"],
        "study_idx": batch["study_idx"],
        "patient_idx": batch["patient_idx"],
        "index": batch["index"],
    }


def report_hash(text: str) -> str:
    """The one hash of a report text (whitespace-normalised SHA-256): dedup collapses reports by it
    and the DP stage compares cohorts by it, so the text itself is never kept."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


@dataclass
class EmbeddingSet:
    """Embeddings of one split: image items and one report per study.

    image_emb [I, D]; report_emb [S, D]; item_study [I] in 0..S-1; study_patient [S]
    (integer codes); study_labels [S, 14] (optional); study_text_hash [S] (optional, for
    dedup; any hashable strings, never the text itself); item_index [I] optional dataset
    indices.
    """

    image_emb: torch.Tensor
    report_emb: torch.Tensor
    item_study: torch.Tensor
    study_patient: torch.Tensor
    study_labels: np.ndarray | None = None
    study_text_hash: list[str] | None = None

    @property
    def n_items(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def n_studies(self) -> int:
        return int(self.report_emb.shape[0])

    @classmethod
    def from_items(
        cls,
        image_emb: Any,
        report_emb: Any,
        study_key: Any,
        patient_key: Any,
        labels: Any = None,
        text_hash: Sequence[str] | None = None,
    ) -> "EmbeddingSet":
        """Build from per-item rows (one row per image; its study's report embedding,
        labels, ids repeated). Rows of one study are collapsed by ``study_key``; they must
        agree (labels and hash exactly, report embeddings up to float noise) or this raises
        naming the row. Blank ids (NaN, "") and object/string dtypes where numbers belong raise."""
        img = as_embeddings(image_emb, "image_emb")
        rep = as_embeddings(report_emb, "report_emb")
        n = img.shape[0]
        if rep.shape[0] != n:
            raise ValueError(f"report_emb has {rep.shape[0]} rows but image_emb has {n} (one row per image item)")
        if rep.shape[1] != img.shape[1]:
            raise ValueError(f"image_emb dim {img.shape[1]} != report_emb dim {rep.shape[1]}")
        skeys = check_ids(study_key, "study_id", n)
        pkeys = check_ids(patient_key, "patient_id", n)
        uniq, first, inv = np.unique(skeys, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.argsort(first)  # studies in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        item_study = torch.as_tensor(rank[inv], dtype=torch.long)
        first_rows = first[order]
        first_of_row = first[inv]  # each row's study's first row
        # one patient per study
        _, p_codes_items = np.unique(pkeys, return_inverse=True)
        p_codes_items = p_codes_items.reshape(-1)
        other = np.flatnonzero(p_codes_items != p_codes_items[first_of_row])
        if other.size:
            r = int(other[0])
            raise ValueError(f"a study_id appears with more than one patient_id: study_id {skeys[r].item()!r} row {r} "
                             f"has patient_id {pkeys[r].item()!r}, row {int(first_of_row[r])} "
                             f"{pkeys[first_of_row[r]].item()!r}")
        study_patient = torch.as_tensor(p_codes_items[first_rows], dtype=torch.long)
        # Rows of one study repeat its report: a row that disagrees would otherwise be dropped
        # silently (first row wins), so refuse, naming it.
        _same_within_study(skeys, first_of_row, "report_emb", _report_conflicts(rep, first_of_row))
        study_labels = None
        if labels is not None:
            lab = check_labels_array(labels, "labels", n)
            same = ((lab == lab[first_of_row]) | (np.isnan(lab) & np.isnan(lab[first_of_row]))).all(axis=1)
            _same_within_study(skeys, first_of_row, "labels", ~same)
            study_labels = lab[first_rows]
        hashes = None
        if text_hash is not None:
            th_arr = np.asarray(text_hash).reshape(-1)
            if th_arr.dtype.kind == "O":
                raise ValueError("report_text_hash has dtype object; expected fixed-width strings")
            th = np.asarray([str(h) for h in th_arr])
            if len(th) != n:
                raise ValueError(f"report_text_hash has {len(th)} entries but image_emb has {n} rows")
            _same_within_study(skeys, first_of_row, "report_text_hash", th != th[first_of_row])
            hashes = [str(th[i]) for i in first_rows]
        del uniq
        return cls(img, rep[torch.as_tensor(first_rows)], item_study, study_patient, study_labels, hashes)


# Unit report vectors of one study's rows may differ by float noise (batches, bf16 autocast: ~1e-2 at
# most); different reports differ by far more. Above this L2 distance the rows disagree.
REPORT_CONFLICT_DISTANCE = 0.05


def _report_conflicts(rep: torch.Tensor, first_of_row: np.ndarray) -> np.ndarray:
    """Rows whose report embedding is not (up to float noise) their study's first row's."""
    out = np.zeros(len(first_of_row), dtype=bool)
    later = np.flatnonzero(first_of_row != np.arange(len(first_of_row)))  # a study's 2nd, 3rd... rows
    if later.size == 0:
        return out

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    rows, refs = torch.as_tensor(later), torch.as_tensor(first_of_row[later])
    out[later] = ((unit(rep[rows]) - unit(rep[refs])).norm(dim=1) > REPORT_CONFLICT_DISTANCE).numpy()
    return out


def _same_within_study(skeys: np.ndarray, first_of_row: np.ndarray, what: str, differs: np.ndarray) -> None:
    if differs.any():
        rows = np.flatnonzero(differs)
        r = int(rows[0])
        raise ValueError(
            f"{rows.size} rows have {what} different from their study's first row: study_id {skeys[r].item()!r} "
            f"row {r} vs row {int(first_of_row[r])} (rows of one study must repeat its report, labels and hash)"
        )


def embedding_set_from_outputs(
    data: dict[str, torch.Tensor], text_hash: Sequence[str] | None = None
) -> EmbeddingSet:
    """Gathered validation outputs (one row per image item) -> EmbeddingSet."""
    th = None
    if text_hash is not None:
        th = [text_hash[int(s)] for s in data["study_idx"].reshape(-1)]
    return EmbeddingSet.from_items(
        data["image_emb"], data["report_emb"], data["study_idx"].reshape(-1).numpy(),
        data["patient_idx"].reshape(-1).numpy(), data["labels"].numpy(), th,
    )
