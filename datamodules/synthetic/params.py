"""The synthetic cohort's parameters (datamodules/synthetic/cohort.py): every parameter that changes the
generated files and the generator version, hashed together into the cohort's cache key. Its own module
so that the sampler (sampling.py) and the generator (cohort.py) both import it, neither the
other."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

GENERATOR_VERSION = "3"  # bump whenever the generated files change for the same parameters


@dataclass(frozen=True)
class CohortParams:
    """Every parameter that changes the generated files (hashed into the cache key)."""

    num_patients: int
    seed: int
    image_size: int
    cohort: str
    style_mix: tuple[tuple[str, float], ...]
    train_style_mix: tuple[tuple[str, float], ...] | None
    exposure_mean: float
    exposure_sd: float
    noise_sd: float
    ap_fraction: float
    icu_fraction: float
    rotation_sd_deg: float
    multi_view_fraction: float
    lateral_fraction: float
    max_views_per_study: int
    num_variants: int
    split_fractions: tuple[float, float, float]
    label_profile: str = "legacy"
    test_patients: int = 0

    @property
    def total_patients(self) -> int:
        return self.num_patients + self.test_patients

    def public(self) -> dict:
        """The parameters as hashed and recorded; `label_profile` only when not legacy and
        `test_patients` only when not 0, so a cohort without them keeps its cache key and
        meta.json from before these options existed."""
        d = asdict(self)
        if d["label_profile"] == "legacy":
            del d["label_profile"]
        if d["test_patients"] == 0:
            del d["test_patients"]
        return d

    def key(self) -> str:
        blob = json.dumps({"params": self.public(), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
