"""End-to-end smoke runs: train.py with every option of every config group, on tiny settings.

Options are discovered from configs/<group>/, so a new config file is smoke-tested without
touching this file. Cohorts that need data on disk (real cohorts) are run end-to-end on exported
trees in tests/test_readers_e2e.py; experiments with their own stage-specific tests say so below.
"""

from __future__ import annotations

import csv
import json
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


# Existing models are audited (tests/test_external_models.py runs them through evaluate.py) or get
# their heads DP-trained (tests/test_dp_external.py); train.py says so instead of failing on model.path.
EXTERNAL = {("model", "hf_clip"), ("model", "open_clip")}


def run_option(compose_train, group: str, option: str, *extra: str) -> dict:
    if (group, option) in EXTERNAL:
        with pytest.raises(ValueError, match="existing model.*evaluate.py.*experiment=dp_alignment"):
            train(compose_train(f"{group}={option}", *extra))
        return {}
    if (group, option) in ELSEWHERE:
        pytest.skip(ELSEWHERE[(group, option)])
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    cfg = compose_train(f"{group}={option}", *EXTRA.get((group, option), []), *extra)
    metrics, objects = train(cfg)
    return metrics


@pytest.mark.slow
def test_default_run_learns_and_audits(compose_train, capsys, caplog) -> None:
    cfg = compose_train("trainer.max_epochs=3", "trainer.limit_train_batches=4", "logger=csv")
    with caplog.at_level("INFO", logger="train"):  # (an in-process experiments.reproduce run quiets it)
        metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    # The console end: one headline naming where the results are, the table once, no Lightning table.
    printed = capsys.readouterr().out + caplog.text
    assert printed.count("Full results: ") == 1 and printed.count("## Re-linkage audit") == 1
    assert "Test metric" not in printed and "Validate metric" not in printed
    # Validation files are named apart from test results, with the checkpoint's 0-based epoch.
    audit_files = sorted(p.name for p in (out / "csv" / "audit").iterdir())
    assert audit_files and all(name.startswith("val_") for name in audit_files), audit_files
    assert "val_relinkage_epoch=002.json" in audit_files
    best = Path(objects["trainer"].checkpoint_callback.best_model_path).name
    meta = json.loads((out / "final_audit" / "audit.json").read_text())["meta"]
    assert meta["checkpoint"] == best and best == f"epoch_{meta['epoch']:03d}.ckpt"
    assert meta["checkpoint_selection"] == "lowest val/loss on the val split"
    assert f"checkpoint={best}" in (out / "final_audit" / "report.md").read_text()
    assert (out / "checkpoints" / "last.ckpt").exists()
    # The audits ran as validation callbacks and as the final test-split audit ...
    assert "audit/i2t/R@1/N=full" in metrics and "probe/macro_auroc" in metrics
    assert "test/audit/i2t/R@1/N=full" in metrics and "test/audit/hardneg/i2t/R@1/N=full" in metrics
    res = json.loads((out / "final_audit" / "audit.json").read_text())
    assert res["meta"]["split"] == "test" and "i2t" in res["relinkage"] and res["probe"]
    assert (out / "final_audit" / "report.md").exists() and (out / "final_audit" / "recall_vs_n.png").exists()
    # ... and the logged curve shows the first epoch's loss above the last one's (it trains).
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # Not a terminal here: one progress line per epoch with the losses, val metrics and the epoch time.
    lines = [r.getMessage() for r in caplog.records if r.name == "train.progress"]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert f"train/loss {losses[-1]:.4f}" in lines[-1] and "val/loss " in lines[-1] and lines[-1].endswith(" s)")
    assert all("val/i2t_acc " in line for line in lines)
    assert f"probe/macro_auroc {metrics['probe/macro_auroc']:.4f}" in lines[-1]  # a watched metric, where it exists


@pytest.mark.slow
def test_resume_keeps_the_checkpoint_tokenizer(compose_train, tmp_path) -> None:
    cfg = compose_train("trainer.max_epochs=1", "final_audit=false", "callbacks=none", "+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                        f"+callbacks.ckpt.dirpath={tmp_path}/ck", "+callbacks.ckpt.save_last=true", "logger=none")
    _, first = train(cfg)
    ckpt = tmp_path / "ck" / "last.ckpt"
    # Resume on a cohort with other reports (another seed): a retrained vocabulary would differ.
    cfg2 = compose_train("trainer.max_epochs=2", "final_audit=false", "callbacks=none", "logger=none",
                         "data.reader.seed=99", f"ckpt_path={ckpt}")
    _, second = train(cfg2)
    assert second["trainer"].current_epoch == 2
    assert second["datamodule"].tokenizer.get_vocab() == first["datamodule"].tokenizer.get_vocab()


@pytest.mark.parametrize("option", options("model"))
@pytest.mark.slow
def test_model_options(compose_train, option, caplog) -> None:
    with caplog.at_level("INFO", logger="train"):
        run_option(compose_train, "model", option)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LLM text tower:")]
    if option == "llm_encoder":  # the default LLM is no released model: the run says so, and how to use one
        assert len(said) == 1 and "tiny decoder LLM (llama, 2 layers, hidden 128)" in said[0] and "no LoRA" in said[0]
        assert "model.text_tower.pretrained=" in said[0]
    else:
        assert not said


@pytest.mark.parametrize("option", options("data"))
@pytest.mark.slow
def test_data_options(compose_train, option) -> None:
    run_option(compose_train, "data", option)


@pytest.mark.parametrize("option", options("trainer"))
@pytest.mark.slow
def test_trainer_options(compose_train, option) -> None:
    run_option(compose_train, "trainer", option, "final_audit=false")


@pytest.mark.parametrize("option", options("logger"))
@pytest.mark.slow
def test_logger_options(compose_train, option) -> None:
    run_option(compose_train, "logger", option, "final_audit=false")


@pytest.mark.parametrize("option", options("callbacks"))
@pytest.mark.slow
def test_callbacks_options(compose_train, option) -> None:
    run_option(compose_train, "callbacks", option)


@pytest.mark.parametrize("option", options("debug"))
@pytest.mark.slow
def test_debug_options(compose_train, option) -> None:
    extra = ["trainer.max_epochs=2"] if option == "overfit" else []
    run_option(compose_train, "debug", option, *extra)


@pytest.mark.parametrize("option", options("experiment"))
@pytest.mark.slow
def test_experiment_options(compose_train, option) -> None:
    run_option(compose_train, "experiment", option)
