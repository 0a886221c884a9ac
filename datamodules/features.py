"""The DP stage's datamodules: cached frozen-encoder features (models/dp/features.py) served as privacy units
for training and as one item per image for evaluation.

``FeatureDataModule`` is a cohort (any reader) seen through a frozen backbone (``experiment=dp_alignment``);
``InMemoryFeatureDataModule`` serves features given as tensors (tests, benchmarks). Both hold what the DP
plan reads of the data (models/dp/plan.py ``DataFacts.of``): ``n_train_units``, ``batch_size``,
``privacy_unit``, ``max_studies_per_patient`` and ``train_max_studies_per_patient``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from cxr_relink.audit.embeddings import report_hash
from cxr_relink.datamodules.datamodule import CXRDataModule, study_text
from cxr_relink.datamodules.records import SPLITS
from cxr_relink.models.dp.features import cached_split_features, cap_studies, pool_units
from cxr_relink.models.dp.plan import PRIVACY_UNITS
from cxr_relink.models.hashing import file_sha256

log = logging.getLogger(__name__)


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
    privacy_unit: str
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
