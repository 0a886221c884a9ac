"""Frozen-encoder features, computed once per split and cached, and the DP stage's privacy units built from
them. The datamodules that serve them (FeatureDataModule, InMemoryFeatureDataModule) are in
datamodules/features.py.

Privacy unit (``privacy_unit``):
* ``study`` (default): one unit = one study = one report and the mean of its views' image features
  (pre-projection). Adding or removing a study -- all its views and its report -- is one DP step of
  adjacency. A patient with k studies is protected at (k eps, k e^{(k-1) eps} delta) (group privacy);
  ``max_studies_per_patient`` caps k by a public number (``cap_studies``), so the record can state a
  per-patient guarantee without reading k from the private data.
* ``patient``: one unit = all studies of one patient (padded to the largest patient, with a mask);
  epsilon then protects a whole patient.

Unit ids are *stable keys*: 63 bits of SHA-256 of the unit's own identifier (patient id + study id, or
patient id), never its row position. ``group_clipping`` groups units by a hash of their id, and its
2C sensitivity needs one unit's arrival to leave every other unit's group unchanged: with positional
ids, one study inserted at the front shifted every id and regrouped everyone (tests/test_dp.py).

Evaluation splits keep one row per *image* (every view is a query, exactly as in stage 2), so the
audit callbacks see the same items on the DP stage as on stage 2.

Cache: ``{cache_dir}/dp_features/{sha256(checkpoint file)[:16]}-{cohort fingerprint[:16]}/{split}.safetensors``,
written atomically (temporary file + rename). The cohort fingerprint hashes the study ids, patient
ids, splits, report texts, image references (array bytes or paths) and every preprocessing setting,
so a changed cohort or preprocessing never reuses stale features; an image file counts by path, size,
mtime, ctime and inode (``models.embedding_cache.image_signature``: replaced in place by ``cp -p``, it
still changes), and the key also holds the source of the code that shapes the features
(``FEATURE_CODE``) and the package versions. A hit is used only when the file reads and holds the
split's studies in order (their stable keys, one row per image); otherwise a WARNING and the split is
computed again. Report text never leaves the hash function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxr_relink.datamodules.datamodule import CXRDataModule
from cxr_relink.datamodules.records import SPLITS, Study
from cxr_relink.models.dp.plan import PRIVACY_UNITS
from cxr_relink.models.embedding_cache import code_hash, image_signature, package_versions

# The code that shapes the cached features: the readers and datamodule, the towers, this module.
FEATURE_CODE = ("datamodules", "models/dual_tower.py", "models/image_towers.py", "models/text_towers.py",
                "models/llm_encoder.py", "models/poolers.py", "models/heads.py", "models/external.py",
                "models/external_heads.py", "models/dp/features.py")

log = logging.getLogger(__name__)

FEATURE_FORMAT = 2  # 2: stable study/patient keys


# --------------------------------------------------------------------------- hashing


def stable_key(*parts: str) -> int:
    """A 63-bit integer key of an identifier (fits int64): the same for the same unit in every
    neighbouring dataset, whatever else is added or removed. Study ids are keyed with their patient id
    because some cohorts (CheXpert Plus: ``study1``) number studies per patient."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def stable_keys(ids: Sequence[str | tuple[str, ...]]) -> torch.Tensor:
    return torch.tensor([stable_key(*((i,) if isinstance(i, str) else i)) for i in ids], dtype=torch.long)


def cohort_fingerprint(studies: Sequence[Study], settings: dict[str, Any]) -> str:
    """Hash of everything that determines the features: records, image refs, text, preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for st in studies:
        h.update(f"\x00{st.study_id}\x01{st.patient_id}\x01{st.split}\x01{len(st.images)}\x01".encode())
        h.update(st.report.encode())
        h.update(np.ascontiguousarray(st.labels).tobytes())
        for ref in st.images:
            if isinstance(ref, np.ndarray):
                h.update(np.ascontiguousarray(ref).tobytes())
            else:  # a file by path, size, mtime, ctime, inode: replaced in place (cp -p) it changes
                h.update(image_signature(ref).encode())
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- feature extraction


@torch.no_grad()
def extract_split_features(backbone, dm: CXRDataModule, split: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Pre-projection features of one split: one image row per view, one report row per study.

    ``backbone`` is a frozen dual tower (``image_features``, ``text_features``); ``dm`` serves the
    split with the backbone's tokenizer, without augmentation.
    """
    studies = dm.studies(split)
    n_studies = len(studies)
    img_rows, item_study, item_index = [], [], []
    text = None
    done = torch.zeros(n_studies, dtype=torch.bool)
    raw_loader = dm.raw_eval_dataloader(split) if hasattr(dm, "raw_eval_dataloader") else dm.eval_dataloader(split)
    for batch in raw_loader:
        s_idx = batch["study_idx"]
        img_rows.append(backbone.image_features(batch["image"].to(device)).float().cpu())
        item_study.append(s_idx)
        item_index.append(batch["index"])
        # Each report once: the first item of each study not seen yet.
        first = torch.zeros_like(s_idx, dtype=torch.bool)
        seen_here: set[int] = set()
        for j, s in enumerate(s_idx.tolist()):
            if not done[s] and s not in seen_here:
                first[j] = True
                seen_here.add(s)
        if first.any():
            ids, mask = batch["input_ids"][first], batch["attention_mask"][first]
            t = backbone.text_features(ids.to(device), mask.to(device)).float().cpu()
            if text is None:
                text = torch.zeros(n_studies, t.shape[1])
            text[s_idx[first]] = t
            done[s_idx[first]] = True
    if not bool(done.all()):
        raise RuntimeError(f"split {split!r}: {int((~done).sum())} studies have no image item; cannot cache their reports")
    return {
        "image": torch.cat(img_rows),
        "item_study": torch.cat(item_study).long(),
        "item_index": torch.cat(item_index).long(),
        "text": text,
        "labels": torch.as_tensor(np.stack([st.labels for st in studies])).float(),
        "study_patient": torch.tensor([dm.patient_index[st.patient_id] for st in studies], dtype=torch.long),
        "study_key": stable_keys([(st.patient_id, st.study_id) for st in studies]),
        "patient_key": stable_keys([st.patient_id for st in studies]),
    }


def _valid_features(path: Path, studies: Sequence[Study]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(the cached features, None) when the file reads and holds ``studies`` in order (their stable
    keys, one image row per view); (None, why not) otherwise."""
    try:
        feats = load_file(str(path))
    except Exception as e:  # truncated, empty, not safetensors: recomputed, never a crash
        return None, f"unreadable ({type(e).__name__}: {e})"
    want = stable_keys([(st.patient_id, st.study_id) for st in studies])
    n_images = sum(len(st.images) for st in studies)
    if "study_key" not in feats or "item_study" not in feats:
        return None, "it lacks study_key/item_study"
    if feats["study_key"].shape != want.shape or not torch.equal(feats["study_key"].long(), want):
        return None, "its studies are not the split's studies in order"
    if feats["item_study"].numel() != n_images or feats.get("image") is None or feats["image"].shape[0] != n_images:
        return None, f"it holds {feats['item_study'].numel()} image rows, the split has {n_images}"
    return feats, None


def cached_split_features(
    backbone, dm: CXRDataModule, split: str, cache_root: Path, ckpt_hash: str, device: torch.device
) -> dict[str, torch.Tensor]:
    settings = {
        "format": FEATURE_FORMAT, "image_size": dm.image_size, "image_channels": dm.image_channels, "mean": dm.mean,
        "std": dm.std, "text_field": dm.text_field, "max_length": dm.max_length,
    }
    # The code and package versions that shape the features (readers, section parser, pixel reader, towers).
    settings.update(code=code_hash(FEATURE_CODE), packages=package_versions())
    all_studies = [st for s in SPLITS for st in dm.studies(s)]
    fp = cohort_fingerprint(all_studies, settings)
    path = cache_root / "dp_features" / f"{ckpt_hash[:16]}-{fp[:16]}" / f"{split}.safetensors"
    if path.exists():
        feats, why = _valid_features(path, dm.studies(split))
        if feats is not None:
            log.info("DP features: cache hit %s", path)
            return feats
        log.warning("DP features: cache %s not used: %s; computing split %r again", path, why, split)
    log.info("DP features: computing split %r once (frozen encoders) -> %s", split, path)
    feats = extract_split_features(backbone, dm, split, device)
    atomic_save(feats, path, {"checkpoint_sha256": ckpt_hash, "cohort_fingerprint": fp, "split": split})
    return feats


# --------------------------------------------------------------------------- units


def pool_units(feats: dict[str, torch.Tensor], privacy_unit: str = "study") -> dict[str, torch.Tensor]:
    """Per-image features of a split -> training units.

    Study units: mean of the study's view features (pre-projection), its report features; m = 1.
    Patient units: the patient's studies stacked (each pooled over its views), padded, masked.
    Returns img [U, m, Di], txt [U, m, Dt], mask [U, m] (float), unit_id [U] (the unit's stable key,
    ``study_key`` or ``patient_key``), unit_patient [U].
    """
    if privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}")
    missing = [k for k in ("study_key", "patient_key") if k not in feats]
    if missing:
        raise ValueError(
            f"features lack {missing}: DP units need stable ids (models.dp.features.stable_keys of the study/patient "
            "ids), not row positions, so that a neighbouring dataset never shifts another unit's id"
        )
    n_st = feats["text"].shape[0]
    d_i = feats["image"].shape[1]
    sums = torch.zeros(n_st, d_i, dtype=feats["image"].dtype).index_add_(0, feats["item_study"], feats["image"])
    counts = torch.bincount(feats["item_study"], minlength=n_st).clamp(min=1).unsqueeze(1)
    study_img = sums / counts
    study_txt = feats["text"]
    patients = feats["study_patient"]
    if privacy_unit == "study":
        return {
            "img": study_img.unsqueeze(1), "txt": study_txt.unsqueeze(1), "mask": torch.ones(n_st, 1, dtype=study_img.dtype),
            "unit_id": feats["study_key"].long().clone(), "unit_patient": patients.clone(),
        }
    uniq, inv = torch.unique(patients, return_inverse=True)
    n_u = uniq.numel()
    per = torch.bincount(inv, minlength=n_u)
    m = int(per.max())
    img = torch.zeros(n_u, m, d_i)
    txt = torch.zeros(n_u, m, study_txt.shape[1])
    mask = torch.zeros(n_u, m)
    slot = torch.zeros(n_u, dtype=torch.long)
    for s in range(n_st):
        u = int(inv[s])
        j = int(slot[u])
        img[u, j], txt[u, j], mask[u, j] = study_img[s], study_txt[s], 1.0
        slot[u] += 1
    unit_key = torch.zeros(n_u, dtype=torch.long).index_copy_(0, inv, feats["patient_key"].long())
    return {"img": img, "txt": txt, "mask": mask, "unit_id": unit_key, "unit_patient": uniq.clone()}


def cap_studies(feats: dict[str, torch.Tensor], cap: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """Keep at most ``cap`` studies per patient: those with the smallest stable study keys (a public rule
    that reads only the patient's own studies). Returns (features, studies dropped, patients capped)."""
    if int(cap) != cap or cap < 1:
        raise ValueError(f"data.max_studies_per_patient must be a positive integer or null, got {cap!r}")
    patient = feats["study_patient"].numpy()
    order = np.lexsort((feats["study_key"].numpy(), patient))  # by patient, then key
    p_sorted = patient[order]
    first = np.r_[0, np.flatnonzero(p_sorted[1:] != p_sorted[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    keep = np.zeros(len(order), dtype=bool)
    keep[order[rank < cap]] = True
    dropped = int((~keep).sum())
    capped = int(np.unique(patient[~keep]).size)
    return (select_studies(feats, torch.from_numpy(keep)) if dropped else feats), dropped, capped


def select_studies(feats: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features of a split restricted to the studies where ``keep`` [S] is true (their image rows
    follow, study indices are renumbered): a neighbouring dataset, for audits and tests."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    new_index = torch.full((keep.numel(),), -1, dtype=torch.long)
    new_index[keep] = torch.arange(int(keep.sum()))
    rows = keep[feats["item_study"]]
    per_study = {k: v[keep] for k, v in feats.items() if k not in ("image", "item_study", "item_index")}
    return {**per_study, "image": feats["image"][rows], "item_study": new_index[feats["item_study"][rows]],
            "item_index": feats["item_index"][rows]}
