"""Frozen-encoder features, computed once per split and cached; the datasets the DP stage trains on.

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

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from cxr_relink.audit.embeddings import report_hash
from cxr_relink.datamodules.datamodule import CXRDataModule, study_text
from cxr_relink.datamodules.records import SPLITS, Study
from cxr_relink.models.embedding_cache import code_hash, image_signature, package_versions
from cxr_relink.models.hashing import file_sha256  # noqa: F401  (also imported from here: models/dp/module.py, experiments/)

# The code that shapes the cached features: the readers and datamodule, the towers, this module.
FEATURE_CODE = ("datamodules", "models/dual_tower.py", "models/image_towers.py", "models/text_towers.py",
                "models/llm_encoder.py", "models/poolers.py", "models/heads.py", "models/external.py",
                "models/external_heads.py", "models/dp/features.py")

log = logging.getLogger(__name__)

PRIVACY_UNITS = ("study", "patient")
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


def _identity(batch):
    return batch


class UnitDataset(Dataset):
    """Training units; ``__getitems__`` gathers a whole batch with one index op (fast on CPU)."""

    def __init__(self, units: dict[str, torch.Tensor]) -> None:
        self.img, self.txt, self.mask, self.unit_id = units["img"], units["txt"], units["mask"], units["unit_id"]

    def __len__(self) -> int:
        return self.img.shape[0]

    def __getitem__(self, i: int):
        return self.img[i], self.txt[i], self.mask[i], self.unit_id[i]

    def __getitems__(self, idx: list[int]):
        ix = torch.as_tensor(idx, dtype=torch.long)
        return self.img[ix], self.txt[ix], self.mask[ix], self.unit_id[ix]


class EvalItemDataset(Dataset):
    """One item per image, as stage 2: its image features, its study's report features, ids."""

    def __init__(self, feats: dict[str, torch.Tensor]) -> None:
        self.f = feats

    def __len__(self) -> int:
        return self.f["image"].shape[0]

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.as_tensor(idx, dtype=torch.long)
        s = self.f["item_study"][ix]
        return {
            "image": self.f["image"][ix],  # cached pre-projection features [b, Di]
            "text_feat": self.f["text"][s],
            "labels": self.f["labels"][s],
            "study_idx": s,
            "patient_idx": self.f["study_patient"][s],
            "index": self.f["item_index"][ix],
        }


class FeatureServing:
    """Loaders over cached features (shared by the cohort-backed and the in-memory datamodules).

    The DP module calls ``train_dataloader()`` once (a plain loader of expected batch size B), makes
    it private (Poisson sampling, rate q = 1 / len(loader)) and hands the private loader back with
    ``set_train_loader``; from then on ``train_dataloader()`` returns it.
    """

    features: dict[str, dict[str, torch.Tensor]]
    units: dict[str, torch.Tensor]
    public: tuple[torch.Tensor, torch.Tensor] | None
    batch_size: int
    eval_batch_size: int
    val_split: str
    test_split: str = "test"
    _train_loader: DataLoader | None = None

    max_studies_per_patient: int | None = None
    train_max_studies_per_patient: int | None = None

    @property
    def n_train_units(self) -> int:
        return int(self.units["img"].shape[0])

    def make_units(self, train: dict[str, torch.Tensor], privacy_unit: str, cap: int | None) -> None:
        """The DP training units of the train split's features, after the per-patient cap (study units)."""
        self.max_studies_per_patient = int(cap) if cap is not None else None
        if cap is not None and privacy_unit == "study":
            train, dropped, capped = cap_studies(train, cap)
            # For the operator only (console): the count reads the private data; dp_state says so.
            log.info("data.max_studies_per_patient=%d: dropped %d train studies of %d patients", cap, dropped, capped)
        self.units = pool_units(train, privacy_unit)
        self.train_max_studies_per_patient = int(torch.unique(train["study_patient"], return_counts=True)[1].max())

    def public_bank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.public

    def plain_train_loader(self) -> DataLoader:
        ds = UnitDataset(self.units)
        sampler = BatchSampler(RandomSampler(ds), batch_size=min(self.batch_size, len(ds)), drop_last=False)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=_identity)

    def set_train_loader(self, loader: DataLoader | None) -> None:
        self._train_loader = loader

    def train_dataloader(self) -> DataLoader:
        return self._train_loader if self._train_loader is not None else self.plain_train_loader()

    def feature_loader(self, split: str, indices: Sequence[int] | None = None) -> DataLoader:
        """Items of ``split`` in order (``indices``: only those items, e.g. the probe's subset)."""
        if split not in self.features:
            raise ValueError(f"no cached features for split {split!r}; have {sorted(self.features)}")
        ds = EvalItemDataset(self.features[split])
        order = list(range(len(ds))) if indices is None else [int(i) for i in indices]
        return DataLoader(ds, batch_sampler=BatchSampler(order, self.eval_batch_size, False), collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return self.feature_loader(self.val_split)

    def test_dataloader(self) -> DataLoader:
        return self.feature_loader(self.test_split)

    def eval_dataloader(self, split: str, indices: Sequence[int] | None = None) -> DataLoader:
        return self.feature_loader(split, indices)


class InMemoryFeatureDataModule(FeatureServing, L.LightningDataModule):
    """Features given as tensors (tests, benchmarks, features computed elsewhere)."""

    def __init__(
        self,
        features: dict[str, dict[str, torch.Tensor]],
        public: tuple[torch.Tensor, torch.Tensor] | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        privacy_unit: str = "study",
        val_split: str = "val",
        max_studies_per_patient: int | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.public = public
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.privacy_unit = privacy_unit
        self.val_split = val_split
        self.make_units(features["train"], privacy_unit, max_studies_per_patient)
        self.tokenizer = None


class FeatureDataModule(FeatureServing, CXRDataModule):
    """A cohort (any reader, same settings as CXRDataModule) seen through a frozen dual tower.

    ``setup`` loads the backbone checkpoint (``models.checkpoint.load_module``), adopts its
    tokenizer, computes (or loads from the cache) the features of every split once under
    ``torch.no_grad``, pools the training split into privacy units, and embeds the public cohort
    (``public_reader``: train split only, so its test split stays clean for transfer evaluation).
    The public cohort must be disjoint from this one (checked on patient ids and report hashes).
    """

    def __init__(
        self,
        reader: Any,
        backbone_ckpt: str,
        public_reader: Any = None,
        public_split: str = "train",
        privacy_unit: str = "study",
        feature_device: str = "auto",
        feature_cache_dir: str | None = None,
        external: dict | None = None,
        max_studies_per_patient: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(reader=reader, **kwargs)
        # An existing model (models/external_heads.py) as the frozen backbone instead of a checkpoint.
        self.external = dict(external) if (external or {}).get("path") else None
        if privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"data.privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}")
        self.backbone_ckpt = backbone_ckpt
        self.public_reader = public_reader
        self.public_split = public_split
        self.privacy_unit = privacy_unit
        self.feature_device = feature_device
        # Study units: a public cap on studies per patient (the reader's own cap, when it has one, bounds it too).
        caps = [c for c in (max_studies_per_patient, getattr(self.reader, "max_studies_per_patient", None)) if c]
        self.study_cap = min(caps) if caps else None
        self.feature_cache_dir = feature_cache_dir or self.cache_dir or os.environ.get("CXR_RELINK_CACHE") or ".cache"
        self.features: dict[str, dict[str, torch.Tensor]] | None = None
        self.public = None

    def raw_eval_dataloader(self, split: str) -> DataLoader:
        """Images and report tokens of a split (CXRDataModule's loader), for feature extraction."""
        return CXRDataModule.eval_dataloader(self, split)

    def _device(self) -> torch.device:
        if self.feature_device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.feature_device)

    def prepare_data(self) -> None:
        self.reader.load()
        if self.public_reader is not None:
            self.public_reader.load()

    def setup(self, stage: str | None = None) -> None:
        if self.features is not None:
            return
        from cxr_relink.models.checkpoint import load_module

        device = self._device()
        if self.external is not None:
            from cxr_relink.models.external_heads import ExternalSplit

            if self.backbone_ckpt:
                raise ValueError("give one frozen backbone: model.backbone_ckpt or model.external.path, not both")
            ext = ExternalSplit.load(self.external)
            backbone = ext.trunk.to(device).eval()
            # The model's own tokenizer and preprocessing (RGB, resize/crop, per-channel mean/std), as
            # evaluate.py feeds it; the cache key is the fingerprint of its files.
            self.tokenizer = backbone.tokenizer
            for key, value in backbone.data_preprocessing.items():
                setattr(self, key, value)
            ckpt_hash = ext.fingerprint
        else:
            if not self.backbone_ckpt:
                raise ValueError("the DP stage needs a frozen backbone: model.backbone_ckpt=<stage-2 checkpoint> or "
                                 "model.external.path=<an existing model's folder> (docs/dp.md)")
            backbone = load_module(self.backbone_ckpt).to(device).eval()
            if self.tokenizer is None:
                self.tokenizer = backbone.tokenizer
            ckpt_hash = file_sha256(self.backbone_ckpt)
        super().setup(stage)
        root = Path(self.feature_cache_dir)
        self.features = {s: cached_split_features(backbone, self, s, root, ckpt_hash, device) for s in SPLITS if self.studies(s)}
        if "train" not in self.features:
            raise ValueError("the cohort's train split is empty: nothing to finetune on")
        self.make_units(self.features["train"], self.privacy_unit, self.study_cap)
        if self.public_reader is not None:
            self.public = self._public_features(backbone, root, ckpt_hash, device)
        del backbone

    def _public_features(self, backbone, root: Path, ckpt_hash: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        pub = CXRDataModule(
            reader=self.public_reader, batch_size=self.eval_batch_size, image_size=self.image_size,
            image_channels=self.image_channels, mean=self.mean, std=self.std, augment=False, text_field=self.text_field,
            max_length=self.max_length, cache_dir=self.cache_dir, image_transform=self.image_transform,
        )
        pub.tokenizer = self.tokenizer
        pub.setup()
        self._check_disjoint(pub)
        feats = cached_split_features(backbone, pub, self.public_split, root, ckpt_hash, device)
        units = pool_units(feats, "study")
        # Served as split "public" too: the DP stage's linear probe trains there, not on the private
        # train split (a probe fitted on the DP units would be a non-private release about them).
        self.features["public"] = feats
        return units["img"][:, 0], units["txt"][:, 0]

    def _check_disjoint(self, pub: CXRDataModule) -> None:
        mine = [st for s in SPLITS for st in self.studies(s)]
        theirs = pub.studies(self.public_split)
        p_overlap = {st.patient_id for st in mine} & {st.patient_id for st in theirs}
        h = lambda st: report_hash(study_text(st, self.text_field))  # noqa: E731
        # The count printed below is a release to whoever reads the console: it is taken over the val and test
        # splits only, never the DP training units (the patient-id check above it is a refusal, not a count).
        not_dp_units = [st for s in SPLITS if s != "train" for st in self.studies(s)]
        t_overlap = {h(st) for st in not_dp_units} & {h(st) for st in theirs}
        if p_overlap:
            raise ValueError(
                f"public cohort shares {len(p_overlap)} patient ids with the private cohort: the public bank must be "
                "disjoint (public_negatives' guarantee treats the bank as public data)"
            )
        if t_overlap:
            log.warning("public cohort shares %d identical report texts with the private cohort's val/test splits "
                        "(templated reports?; the train split, the DP units, is not counted)", len(t_overlap))
