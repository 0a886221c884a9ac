"""The LightningDataModule: Study records from any reader -> batches of images and report tokens.

Dataset items are images (one per view); each carries its study's report, because the study is the
retrieval ground truth (every image of a study has that study's report as its one true target).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from cxr_relink.datamodules.reader_utils import _bomb_reason, grey_uint8
from cxr_relink.datamodules.records import SPLITS, TEXT_FIELDS, Study
from cxr_relink.datamodules.text import build_tokenizer

log = logging.getLogger(__name__)


def study_text(study: Study, text_field: str) -> str:
    """The report text a model sees (``Study.text``). Falls back to the full report when a section is empty."""
    return study.text(text_field)


def load_image(ref: Any, where: str) -> np.ndarray:
    """An image reference (HxW uint8 array or a file path) -> HxW uint8 array (grey-scale)."""
    if isinstance(ref, np.ndarray):
        if ref.ndim != 2 or ref.dtype != np.uint8:
            raise ValueError(f"{where}: expected a 2-D uint8 grey-scale array, got shape {ref.shape} dtype {ref.dtype}")
        return ref
    try:
        with Image.open(ref) as im:
            # One rule for every bit depth (16-bit scaled by its format's range, not stretched).
            return grey_uint8(im, f"{where}: image file {ref}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file {ref} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: image file {ref} could not be decoded ({type(e).__name__}: {e})") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{where}: image file {ref}: {_bomb_reason(e)}") from None


class StudyImageDataset(Dataset):
    """One item per image. Reports are tokenised once up front (cheap, and keeps workers light)."""

    def __init__(
        self,
        studies: Sequence[Study],
        tokenizer,
        patient_index: dict[str, int],
        transform,
        text_field: str = "report",
        max_length: int = 128,
        image_channels: int = 1,
    ) -> None:
        self.studies = list(studies)
        self.transform = transform
        self.image_channels = image_channels
        self.items = [(s, v) for s, st in enumerate(self.studies) for v in range(len(st.images))]
        no_images = sum(1 for st in self.studies if not st.images)
        if no_images:
            # Such a study has no query image; its report still sits in the audit's candidate pool
            # only if another item carries it, so say how many there are.
            log.warning("%d of %d studies have no image and yield no item", no_images, len(self.studies))
        texts = [study_text(st, text_field) for st in self.studies]
        enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
        self.input_ids = enc["input_ids"]
        self.n_truncated = sum(1 for ids in self.input_ids if len(ids) >= max_length)
        if self.n_truncated:
            log.info("%d of %d reports truncated to max_length=%d tokens (%s)", self.n_truncated, len(texts), max_length, text_field)
        self.patient_idx = [patient_index[st.patient_id] for st in self.studies]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, v = self.items[index]
        st = self.studies[s]
        img = load_image(st.images[v], where=f"study {st.study_id} image {v}")
        x = torch.from_numpy(np.array(img, copy=True)).unsqueeze(0)  # uint8 [1,H,W]
        x = self.transform(x)
        if self.image_channels != 1:
            x = x.expand(self.image_channels, -1, -1)
        return {
            "image": x,
            "input_ids": self.input_ids[s],
            "labels": torch.from_numpy(st.labels),
            "study_idx": s,
            "patient_idx": self.patient_idx[s],
            "index": index,
        }


def collate(items: list[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack images, pad token ids to the longest report in the batch (dynamic padding)."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[i, sl] = torch.as_tensor(it["input_ids"], dtype=torch.long)
        mask[i, sl] = 1
    return {
        "image": torch.stack([it["image"] for it in items]),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.stack([it["labels"] for it in items]),
        "study_idx": torch.tensor([it["study_idx"] for it in items], dtype=torch.long),
        "patient_idx": torch.tensor([it["patient_idx"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


class CXRDataModule(L.LightningDataModule):
    """Any cohort reader + a tokenizer -> train/val/test dataloaders of image-report batches.

    `val_split` names the split that `val_dataloader` serves (the per-epoch audits run on it) and
    `test_split` the one `test_dataloader` serves (train.py's final audit, evaluate.py's `split=`).
    Both are fixed at construction: the final audit is `trainer.test`, not a flag flipped mid-run.
    """

    def __init__(
        self,
        reader: Any,
        tokenizer: dict | None = None,
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 128,
        image_channels: int = 1,
        mean: float = 0.5,
        std: float = 0.25,
        augment: bool = True,
        text_field: str = "report",
        max_length: int = 128,
        val_split: str = "val",
        test_split: str = "test",
        cache_dir: str | None = None,
        pin_memory: bool = False,
        image_transform: Any = None,
    ) -> None:
        super().__init__()
        if text_field not in TEXT_FIELDS:
            raise ValueError(f"data.text_field must be one of {TEXT_FIELDS}, got {text_field!r}")
        for key, value in (("val_split", val_split), ("test_split", test_split)):
            if value not in SPLITS:
                raise ValueError(f"data.{key} must be one of {SPLITS}, got {value!r}")
        self.reader = reader
        self.root = root  # where a real cohort lives (the reader's configs interpolate it); None for generated ones
        self.tokenizer_cfg = dict(tokenizer or {})
        self.tokenizer = None  # set by setup(), or by the caller (evaluate.py uses the checkpoint's)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.image_channels = image_channels
        self.mean, self.std = mean, std
        self.augment = augment
        self.text_field = text_field
        self.max_length = max_length
        self.val_split = val_split
        self.test_split = test_split
        self.cache_dir = cache_dir
        self.pin_memory = pin_memory
        # A callable that replaces the built-in transform (uint8 [1,H,W] -> image tensor): evaluate.py
        # sets an existing model's own preprocessing here (models/external.py).
        self.image_transform = image_transform
        self._studies: dict[str, list[Study]] | None = None
        self._datasets: dict[tuple[str, bool], StudyImageDataset] = {}

    # ---- data ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Generation / indexing happens here once (rank 0); readers cache on disk.
        self.reader.load()

    def setup(self, stage: str | None = None) -> None:
        if self._studies is None:
            studies = self.reader.load()
            by_split: dict[str, list[Study]] = {s: [] for s in SPLITS}
            for st in studies:
                by_split[st.split].append(st)
            # Splits are by patient: a patient in two splits would leak its anatomy into evaluation.
            seen: dict[str, str] = {}
            crossing = sorted({st.patient_id for st in studies if seen.setdefault(st.patient_id, st.split) != st.split})
            if crossing:
                raise ValueError(
                    f"{len(crossing)} patients have studies in more than one split (e.g. {crossing[:3]}); "
                    "splits must be by patient"
                )
            self._studies = by_split
            # Patient ids -> ints over the whole cohort (stable: sorted), for bootstrap by patient.
            self.patient_index = {p: i for i, p in enumerate(sorted({st.patient_id for st in studies}))}
            log.info("cohort: %s", {s: f"{len(v)} studies" for s, v in by_split.items()})
        if self.tokenizer is None:
            train_texts = [study_text(st, self.text_field) for st in self._studies["train"]]
            cfg = dict(self.tokenizer_cfg)
            self.tokenizer = build_tokenizer(train_texts if not cfg.get("pretrained") else None, cache_dir=self.cache_dir, **cfg)

    @property
    def has_labels(self) -> bool:
        """Whether any study of the cohort has a CheXpert label (Open-I without labels_csv has none):
        audits that need labels (hard negatives, the linear probe) check it instead of failing."""
        if self._studies is None:
            self.setup()
        return any(bool(np.isfinite(st.labels).any()) for split in self._studies.values() for st in split)

    def studies(self, split: str) -> list[Study]:
        if self._studies is None:
            self.setup()
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._studies[split]

    def transform(self, train: bool):
        if self.image_transform is not None:
            return self.image_transform
        # Mild, anatomy-preserving augmentation: flips would swap the side a report states.
        ops: list = [v2.ToDtype(torch.float32, scale=True)]
        if train and self.augment:
            ops += [
                v2.RandomResizedCrop(self.image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomAffine(degrees=5),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        else:
            ops += [v2.Resize((self.image_size, self.image_size), antialias=True)]
        ops += [v2.Normalize(mean=[self.mean], std=[self.std])]
        return v2.Compose(ops)

    def dataset(self, split: str, train: bool = False) -> StudyImageDataset:
        key = (split, train)
        if key not in self._datasets:
            studies = self.studies(split)
            if not studies:
                raise ValueError(f"split {split!r} of the cohort is empty; cannot build a dataloader for it")
            if not any(st.images for st in studies):
                # Otherwise torch fails later with "num_samples=0", naming nothing.
                why = getattr(self.reader, "no_images_reason", None) or "no study has an image file"
                raise ValueError(
                    f"split {split!r}: none of its {len(studies)} studies has an image ({why}); the image-report "
                    "model needs images: point the reader at them (e.g. data.reader.images_dir=...), or use a "
                    "text-side stage on reports only (experiment=text_adapt)"
                )
            self._datasets[key] = StudyImageDataset(
                studies,
                self.tokenizer,
                self.patient_index,
                self.transform(train),
                text_field=self.text_field,
                max_length=self.max_length,
                image_channels=self.image_channels,
            )
        return self._datasets[key]

    def _loader(self, split: str, train: bool, indices: Sequence[int] | None = None) -> DataLoader:
        ds = self.dataset(split, train=train)
        return DataLoader(
            ds if indices is None else Subset(ds, [int(i) for i in indices]),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,  # in-batch contrastive loss: a tiny last batch is a noisy step
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id, padding_side=self.tokenizer.padding_side),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, train=False)

    def eval_dataloader(self, split: str, indices: Sequence[int] | None = None) -> DataLoader:
        """Deterministic, un-augmented loader of any split (linear probe, feature caching); `indices`
        picks dataset items (e.g. `audit.probe.subsample_rows(len(dm.dataset(split)), cap, seed)`)."""
        if indices is None:  # subclasses (report variants) override _loader(split, train)
            return self._loader(split, train=False)
        return self._loader(split, train=False, indices=indices)
