"""Shared test fixtures: Hydra composition of the real configs, shrunk to tiny settings."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports torch (its OpenMP runtime reads this once, at load): idle OpenMP threads
# sleep instead of spinning. On a shared CPU machine (CI, other jobs) spinning threads steal the
# cores the working ones need; on 2 cores at load 3-4 that made tests 5-7x slower
# (docs/benchmarks.md, "Training").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from cxr_relink.configs import CONFIG_DIR as _CONFIG_DIR  # importing configs sets CXR_RELINK_ROOT
from cxr_relink.configs import ROOT  # noqa: F401  (tests import it from here)

CONFIG_DIR = str(_CONFIG_DIR)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Tiny settings that every smoke run shares: a small cohort at 32x32, two short epochs.
TINY = [
    "data.reader.num_patients=40",
    "data.reader.image_size=32",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (20x faster here).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (generated cohorts, tokenizers, features) per test session."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["CXR_RELINK_CACHE"] = str(path)
    return path


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a real config (as the CLI would) and point its outputs at `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as the CLI hands it to the task: the hydra node lives in HydraConfig
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compose_train(tmp_path, cache_dir):
    def _compose(*overrides: str, tiny: bool = True) -> DictConfig:
        return compose_config("train.yaml", (TINY if tiny else []) + list(overrides), tmp_path)

    return _compose


def random_studies(n_patients: int = 6, seed: int = 0, size: int = 32):
    """Hand-made Study records with random images (for unit tests independent of the generator)."""
    from cxr_relink.datamodules.records import NUM_LABELS, Study

    rng = np.random.default_rng(seed)
    words = ["small", "left", "right", "effusion", "opacity", "clear", "lungs", "heart", "normal", "tube"]
    studies = []
    for p in range(n_patients):
        split = ("train", "val", "test")[p % 3]
        for s in range(1 + p % 2):
            labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=NUM_LABELS)
            text = " ".join(rng.choice(words, size=8))
            studies.append(
                Study(
                    study_id=f"s{p}_{s}", patient_id=f"p{p}",
                    images=[rng.integers(0, 255, size=(size, size), dtype=np.uint8) for _ in range(1 + s)],
                    report=f"FINDINGS: {text}. IMPRESSION: {text}.", findings=text, impression=text,
                    labels=labels, split=split, source="handmade",
                )
            )
    return studies


class InMemoryReader:
    """A reader over a given list of Study records."""

    def __init__(self, studies):
        self._studies = studies

    def load(self):
        return self._studies
