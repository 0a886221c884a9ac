"""Reports-only batches for stage 1 (text domain adaptation): studies with their report variants.

Each dataset item is one study; a batch holds `variants_per_study` clinically equivalent texts of each
of its studies (positives for each other under supervised contrastive learning) plus up to
`error_variants_per_study` one-error variants of the same report (hard negatives), all tokenised:

    input_ids, attention_mask  long [S*V, L]   variant texts, grouped by study
    group_ids                  long [S*V]      study index within the split (positives share it)
    hard_input_ids, hard_attention_mask  long [H, L]   one-error variants (H may be 0)
    hard_group_ids             long [H]        the study each error variant was made from
    study_idx                  long [S]

Where variants come from:
- the synthetic cohort: `Study.extras["variants"]` (list of {"style", "text"}) and
  `extras["error_variants"]` (list of {"error", "text"}), plus the study's own report;
- cohorts without them (e.g. `data=openi`, reports only): variants are derived from the report itself
  (`derived_variants`): FINDINGS/IMPRESSION sections in the other order, the same text with common
  radiology abbreviations, and an abbreviated impression-first rendering. An error variant is made by
  swapping the first left/right mention (exactly one change of side); reports without one have none.
  These are weaker than the synthetic cohort's variants (no paraphrase, no change of institutional
  style) - they teach invariance to section order and shorthand only.

It subclasses CXRDataModule to reuse its reader, splits and tokenizer building (the same tokenizer
stage 2 builds from the same training reports); images are never loaded.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxr_relink.datamodules.datamodule import CXRDataModule, study_text
from cxr_relink.datamodules.records import Study

# A small, common radiology shorthand list (word-boundary, case-insensitive), longest first.
ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("no acute cardiopulmonary process", "NACPP"),
    ("no acute cardiopulmonary abnormality", "NACPA"),
    ("pleural effusions", "effs"),
    ("pleural effusion", "eff"),
    ("pneumothorax", "PTX"),
    ("pneumonia", "PNA"),
    ("atelectasis", "atx"),
    ("consolidation", "consol"),
    ("cardiomegaly", "CMG"),
    ("endotracheal tube", "ETT"),
    ("nasogastric tube", "NGT"),
    ("central venous catheter", "CVC"),
    ("right lower lobe", "RLL"),
    ("right middle lobe", "RML"),
    ("right upper lobe", "RUL"),
    ("left lower lobe", "LLL"),
    ("left upper lobe", "LUL"),
    ("bilateral", "b/l"),
    ("without", "w/o"),
    ("with", "w/"),
    ("left", "L"),
    ("right", "R"),
    ("opacity", "opac"),
    ("opacities", "opacs"),
    ("pulmonary", "pulm"),
    ("history", "hx"),
    ("unchanged", "unchgd"),
    ("approximately", "approx"),
)
_ABBR_RE = [(re.compile(rf"\b{re.escape(a)}\b", re.IGNORECASE), b) for a, b in ABBREVIATIONS]
_SIDE_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def abbreviate(text: str) -> str:
    for pat, short in _ABBR_RE:
        text = pat.sub(short, text)
    return text


def swap_first_side(text: str) -> str | None:
    """The text with its first 'left'/'right' swapped (one change of side), or None if it has none."""
    m = _SIDE_RE.search(text)
    if m is None:
        return None
    word = m.group(0)
    other = {"left": "right", "right": "left"}[word.lower()]
    if word[0].isupper():
        other = other.capitalize() if not word.isupper() else other.upper()
    return text[: m.start()] + other + text[m.end() :]


def derived_variants(study: Study) -> list[str]:
    """Clinically equivalent re-renderings of a report without variants of its own (see module doc)."""
    f, i = (study.findings or "").strip(), (study.impression or "").strip()
    out = []
    if f and i:
        out.append(f"IMPRESSION: {i}\nFINDINGS: {f}")
        out.append(f"FINDINGS: {abbreviate(f)}\nIMPRESSION: {abbreviate(i)}")
        out.append(f"{abbreviate(i)}. {abbreviate(f)}")
    else:
        body = (i or f or study.report).strip()
        out.append(abbreviate(study.report))
        out.append(body.lower())
    return [t for t in dict.fromkeys(out) if t and t != study.report]


def variant_pool(study: Study, derive: bool = True, text_field: str = "report") -> list[str]:
    """All equivalent texts of a study: the text stage 2 will see (`text_field`), its given variants,
    derived ones when none are given."""
    given = [v["text"] for v in study.extras.get("variants", []) or [] if v.get("text")]
    pool = [study_text(study, text_field)] + given
    if derive and not given:
        pool += derived_variants(study)
    return list(dict.fromkeys(t for t in pool if t))


def error_pool(study: Study, derive: bool = True, text_field: str = "report") -> list[str]:
    given = [v["text"] for v in study.extras.get("error_variants", []) or [] if v.get("text")]
    if given or not derive:
        return given
    swapped = swap_first_side(study_text(study, text_field))
    return [swapped] if swapped else []


class StudyVariantsDataset(Dataset):
    """One item per study: `variants_per_study` texts (sampled when training, the first ones otherwise)
    and up to `error_variants_per_study` error variants."""

    def __init__(self, studies: Sequence[Study], variants_per_study: int = 2, error_variants_per_study: int = 1,
                 train: bool = True, derive: bool = True, text_field: str = "report") -> None:
        if variants_per_study < 2:
            raise ValueError("variants_per_study must be >= 2 (supervised contrastive needs positives)")
        self.studies = list(studies)
        self.pools = [variant_pool(s, derive, text_field) for s in self.studies]
        self.errors = [error_pool(s, derive, text_field) for s in self.studies]
        self.v, self.e, self.train = variants_per_study, error_variants_per_study, train

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pool, errs = self.pools[index], self.errors[index]
        if self.train:
            # Drawn from torch's RNG so Lightning's seeding (incl. worker seeding) makes it reproducible.
            rng = np.random.default_rng(int(torch.randint(2**31 - 1, ()).item()))
            texts = [pool[j] for j in rng.permutation(len(pool))[: self.v]]
            errors = [errs[j] for j in rng.permutation(len(errs))[: self.e]]
        else:
            texts, errors = pool[: self.v], errs[: self.e]
        # A fixed count per study keeps batch shapes equal across DDP ranks; a study with too few
        # variants repeats them (an exact duplicate is a trivial but harmless positive).
        texts = (texts * self.v)[: self.v]
        return {"texts": texts, "errors": errors, "study_idx": index}


def collate_variants(items: list[dict[str, Any]], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    texts = [t for it in items for t in it["texts"]]
    groups = [it["study_idx"] for it in items for _ in it["texts"]]
    errors = [t for it in items for t in it["errors"]]
    hard_groups = [it["study_idx"] for it in items for _ in it["errors"]]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "group_ids": torch.tensor(groups, dtype=torch.long),
        "study_idx": torch.tensor([it["study_idx"] for it in items], dtype=torch.long),
        "hard_group_ids": torch.tensor(hard_groups, dtype=torch.long),
    }
    if errors:
        h = tokenizer(errors, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch["hard_input_ids"], batch["hard_attention_mask"] = h["input_ids"], h["attention_mask"]
    else:
        batch["hard_input_ids"] = torch.zeros((0, 1), dtype=torch.long)
        batch["hard_attention_mask"] = torch.zeros((0, 1), dtype=torch.long)
    return batch


class ReportVariantsDataModule(CXRDataModule):
    """Stage-1 datamodule: CXRDataModule's reader, splits and tokenizer; batches of report variants.

    batch_size counts studies (a batch holds batch_size * variants_per_study texts). Image settings
    inherited from the data config are accepted and unused.
    """

    def __init__(self, *args, variants_per_study: int = 2, error_variants_per_study: int = 1,
                 derive_variants: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.variants_per_study = variants_per_study
        self.error_variants_per_study = error_variants_per_study
        self.derive_variants = derive_variants
        self._variant_sets: dict[tuple[str, bool], StudyVariantsDataset] = {}

    def variants_dataset(self, split: str, train: bool) -> StudyVariantsDataset:
        key = (split, train)
        if key not in self._variant_sets:
            studies = self.studies(split)
            if not studies:
                raise ValueError(f"split {split!r} of the cohort is empty; cannot build a dataloader for it")
            self._variant_sets[key] = StudyVariantsDataset(
                studies, self.variants_per_study, self.error_variants_per_study, train=train, derive=self.derive_variants,
                text_field=self.text_field,
            )
        return self._variant_sets[key]

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.variants_dataset(split, train),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=partial(collate_variants, tokenizer=self.tokenizer, max_length=self.max_length),
        )
