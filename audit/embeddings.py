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

from datamodules.records import NUM_LABELS

# What every embedding module's ``validation_step`` returns (DESIGN.md, "Contracts"): the audit
# callbacks collect these keys without knowing the model.
VALIDATION_KEYS = ("image_emb", "report_emb", "labels", "study_idx", "patient_idx", "index")


def as_embeddings(x: Any, name: str) -> torch.Tensor:
    """A finite, non-empty float [n, d] tensor, or a ValueError naming ``name``."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to audit; is the split empty?")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")
    if not t.is_floating_point():
        t = t.float()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN/inf values in {int(bad.sum())} rows (first rows: {rows})")
    return t.float()


def l2_normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        rows = (norms.flatten() == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has all-zero rows (cannot be normalised): first rows {rows}")
    return x / norms


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
        labels, ids repeated). Rows of one study are collapsed by ``study_key`` (first
        occurrence wins for the report embedding)."""
        img = as_embeddings(image_emb, "image_emb")
        rep = as_embeddings(report_emb, "report_emb")
        n = img.shape[0]
        if rep.shape[0] != n:
            raise ValueError(f"report_emb has {rep.shape[0]} rows but image_emb has {n} (one row per image item)")
        if rep.shape[1] != img.shape[1]:
            raise ValueError(f"image_emb dim {img.shape[1]} != report_emb dim {rep.shape[1]}")
        skeys = np.asarray(study_key).reshape(-1)
        pkeys = np.asarray(patient_key).reshape(-1)
        for name, arr in (("study_id", skeys), ("patient_id", pkeys)):
            if arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} entries but image_emb has {n} rows")
        uniq, first, inv = np.unique(skeys, return_index=True, return_inverse=True)
        order = np.argsort(first)  # studies in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        item_study = torch.as_tensor(rank[inv.reshape(-1)], dtype=torch.long)
        first_rows = first[order]
        s_pat = pkeys[first_rows]
        # one patient per study
        _, p_codes_items = np.unique(pkeys, return_inverse=True)
        p_codes_items = p_codes_items.reshape(-1)
        if not np.array_equal(p_codes_items, p_codes_items[first_rows][rank[inv.reshape(-1)]]):
            raise ValueError("a study_id appears with more than one patient_id")
        study_patient = torch.as_tensor(p_codes_items[first_rows], dtype=torch.long)
        study_labels = None
        if labels is not None:
            lab = np.asarray(labels, dtype=np.float32)
            if lab.ndim != 2 or lab.shape != (n, NUM_LABELS):
                raise ValueError(f"labels must have shape [{n}, {NUM_LABELS}], got {lab.shape}")
            study_labels = lab[first_rows]
        hashes = None
        if text_hash is not None:
            th = [str(h) for h in np.asarray(text_hash).reshape(-1)]
            if len(th) != n:
                raise ValueError(f"report_text_hash has {len(th)} entries but image_emb has {n} rows")
            hashes = [th[i] for i in first_rows]
        del s_pat, uniq
        return cls(img, rep[torch.as_tensor(first_rows)], item_study, study_patient, study_labels, hashes)


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
