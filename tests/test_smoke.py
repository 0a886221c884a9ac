"""End-to-end smoke runs: train.py with every option of every config group, on tiny settings.

Options are discovered from configs/<group>/, so a new config file is smoke-tested without
touching this file. Cohorts that need data on disk (real cohorts) are run end-to-end on exported
trees in tests/test_readers_e2e.py; experiments with their own stage-specific tests say so below.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIG_DIR

from train import train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


# Options that cannot run from the embedded default alone, with where they are covered instead.
ELSEWHERE = {
    ("data", "mimic_cxr"): "needs a cohort on disk: tests/test_readers_e2e.py runs it on an exported tree",
    ("data", "chexpert_plus"): "needs a cohort on disk: tests/test_readers_e2e.py runs it on an exported tree",
    ("data", "openi"): "needs a cohort on disk: tests/test_readers_e2e.py runs it on an exported tree",
    ("experiment", "dp_alignment"): "needs a stage-2 checkpoint: tests/test_dp.py::test_experiment_end_to_end_caches_features_and_rebuilds runs it",
}
# Extra overrides an option needs on tiny settings.
EXTRA = {
    ("trainer", "ddp"): ["trainer.accelerator=cpu", "trainer.strategy=ddp_spawn", "trainer.devices=2"],
    ("trainer", "gpu"): [],
}


def run_option(compose_train, group: str, option: str, *extra: str) -> dict:
    if (group, option) in ELSEWHERE:
        pytest.skip(ELSEWHERE[(group, option)])
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    cfg = compose_train(f"{group}={option}", *EXTRA.get((group, option), []), *extra)
    metrics, objects = train(cfg)
    return metrics


def test_default_run_learns_and_audits(compose_train) -> None:
    cfg = compose_train("trainer.max_epochs=3", "trainer.limit_train_batches=4")
    metrics, objects = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    out = Path(cfg.paths.output_dir)
    assert (out / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("option", options("model"))
def test_model_options(compose_train, option) -> None:
    run_option(compose_train, "model", option)


@pytest.mark.parametrize("option", options("data"))
def test_data_options(compose_train, option) -> None:
    run_option(compose_train, "data", option)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(compose_train, option) -> None:
    run_option(compose_train, "trainer", option, "final_audit=false")


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(compose_train, option) -> None:
    run_option(compose_train, "logger", option, "final_audit=false")


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_options(compose_train, option) -> None:
    run_option(compose_train, "callbacks", option)


@pytest.mark.parametrize("option", options("debug"))
def test_debug_options(compose_train, option) -> None:
    extra = ["trainer.max_epochs=2"] if option == "overfit" else []
    run_option(compose_train, "debug", option, *extra)


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(compose_train, option) -> None:
    run_option(compose_train, "experiment", option)
