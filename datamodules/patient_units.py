"""Data for whole-model DP-SGD (models/dp/whole.py): the private train split as **patient units** on raw
images and reports, and a public cohort whose pairs are the fixed negatives of the loss.

One unit = one patient = every image item of every study of that patient in the train split (all of a
patient's studies are in one unit, so add/remove adjacency is add/remove of a patient). Each step draws
units by Poisson sampling (Opacus' ``UniformWithReplacementSampler``, rate q from the plan, a secret
generator the module hands in); a batch is a list of per-unit collated batches, so the module can take one
gradient per unit and clip it.

``max_pairs_per_unit`` (public) caps the image items of a unit that one step reads (drawn within the unit):
the compute of a step is then bounded, and since the draw reads only that unit, it is part of the unit's
own loss (a unit's clipped gradient is still a function of that unit alone: the sensitivity stays C).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, Subset

from cxr_relink.datamodules.datamodule import CXRDataModule, StudyImageDataset, collate

log = logging.getLogger(__name__)


class PatientUnits(Dataset):
    """Unit u -> the collated items (images + their studies' reports) of one train patient."""

    def __init__(self, items: StudyImageDataset, pad_token_id: int, padding_side: str, max_pairs: int | None,
                 seed: int = 0) -> None:
        self.items = items
        groups: dict[int, list[int]] = {}
        for i, (s, _v) in enumerate(items.items):
            groups.setdefault(items.patient_idx[s], []).append(i)
        self.patients = sorted(groups)
        self.groups = [groups[p] for p in self.patients]
        self.collate = partial(collate, pad_token_id=pad_token_id, padding_side=padding_side)
        self.max_pairs = None if not max_pairs else int(max_pairs)
        self.seed = int(seed)
        self.draws = 0

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, u: int) -> dict[str, Any]:
        idx = self.groups[u]
        if self.max_pairs and len(idx) > self.max_pairs:
            # Drawn within the unit (reads no other unit): part of this unit's own loss.
            pick = torch.randperm(len(idx))[: self.max_pairs].tolist()
            idx = [idx[i] for i in sorted(pick)]
        out = self.collate([self.items[i] for i in idx])
        out["unit"] = u
        return out


def unit_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate of a unit batch: the list itself (units are processed one by one; an empty Poisson batch is [])."""
    return list(batch)


class PatientUnitDataModule(CXRDataModule):
    """A cohort datamodule whose train loader yields patient units (for models.dp.whole.DPWholeModule), plus a
    public cohort (``public_reader``) for the loss's fixed negatives. Val/test loaders are the cohort's own."""

    def __init__(self, *args, public_reader: Any = None, max_pairs_per_unit: int | None = 4,
                 privacy_unit: str = "patient", tokenizer_ckpt: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if privacy_unit != "patient":
            # Study units on raw data would need the per-patient group-privacy statement of the head stage;
            # the whole-model stage protects patients only (the unit issue #31 asks for).
            raise ValueError(f"whole-model DP uses patient units only (data.privacy_unit=patient), got {privacy_unit!r}")
        self.privacy_unit = privacy_unit
        self.tokenizer_ckpt = tokenizer_ckpt
        self.public_reader = public_reader
        self.max_pairs_per_unit = max_pairs_per_unit
        self._units: PatientUnits | None = None
        self._public: StudyImageDataset | None = None
        self._train_loader: DataLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None and self.tokenizer_ckpt:
            # The public starting checkpoint's tokenizer (model.init_ckpt): its token ids, and no vocabulary
            # fitted on the private reports.
            from cxr_relink.datamodules.text import tokenizer_from_state
            from cxr_relink.models.checkpoint import KEY, load_checkpoint_dict

            self.tokenizer = tokenizer_from_state(load_checkpoint_dict(self.tokenizer_ckpt)[KEY]["tokenizer"])
        super().setup(stage)
        if self._units is None:
            self._units = PatientUnits(self.dataset("train", train=True), self.tokenizer.pad_token_id,
                                       self.tokenizer.padding_side, self.max_pairs_per_unit)
        if self._public is None and self.public_reader is not None:
            studies = [st for st in self.public_reader.load() if st.split == "train" and st.images]
            if not studies:
                raise ValueError("the public cohort's train split has no study with an image")
            private = {st.patient_id for split in self._studies.values() for st in split}
            shared = sorted({st.patient_id for st in studies} & private)
            if shared:
                raise ValueError(f"{len(shared)} patients are in both the public and the private cohort (e.g. {shared[:3]}): "
                                 "the public negatives must hold no private unit")
            index = {p: i for i, p in enumerate(sorted({st.patient_id for st in studies}))}
            self._public = StudyImageDataset(studies, self.tokenizer, index, self.transform(False),
                                             text_field=self.text_field, max_length=self.max_length,
                                             image_channels=self.image_channels)

    # ---- what the plan reads (models/dp/plan.py DataFacts.of) -------------------------------------------
    @property
    def units(self) -> PatientUnits:
        if self._units is None:
            self.setup("fit")
        return self._units

    @property
    def n_train_units(self) -> int:
        return len(self.units)

    # ---- public negatives ---------------------------------------------------------------------------
    def public_bank(self, k: int, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
        """k public image items (with their reports), drawn with the given (public, seeded) generator."""
        if self._public is None:
            return None
        n = len(self._public)
        idx = torch.randperm(n, generator=generator)[: min(int(k), n)].tolist()
        return collate([self._public[i] for i in idx], pad_token_id=self.tokenizer.pad_token_id,
                       padding_side=self.tokenizer.padding_side)

    # ---- train loaders --------------------------------------------------------------------------------
    def poisson_loader(self, sample_rate: float, generator: torch.Generator) -> DataLoader:
        """Poisson sampling of units at rate q: each step includes each unit independently with probability q,
        1/q steps per epoch (Opacus' sampler; the accountant assumes exactly this)."""
        sampler = UniformWithReplacementSampler(num_samples=len(self.units), sample_rate=sample_rate, generator=generator)
        return DataLoader(self.units, batch_sampler=sampler, collate_fn=unit_list, num_workers=0)

    def eval_dataloader(self, split: str, indices=None) -> DataLoader:
        """As the cohort's, plus ``split="public"``: the public cohort's train split (the linear probe of a DP run
        is fitted there, callbacks.linear_probe.train_split=public: a probe fitted on DP units is not private)."""
        if split != "public":
            return super().eval_dataloader(split, indices)
        if self._public is None:
            raise ValueError("split 'public' needs a public cohort (data.public_reader)")
        ds = self._public if indices is None else Subset(self._public, [int(i) for i in indices])
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=0,
                          collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id,
                                             padding_side=self.tokenizer.padding_side))

    def set_train_loader(self, loader: DataLoader) -> None:
        self._train_loader = loader

    def train_dataloader(self) -> DataLoader:
        if self._train_loader is None:
            raise RuntimeError("PatientUnitDataModule: the train loader is set by DPWholeModule.configure_optimizers "
                               "(models/dp/whole.py); use it with that module (experiment=dp_whole)")
        return self._train_loader
