"""Progress where no progress bar is seen (a log file, redirected stdout), and a resume that says
what it changed (issue #29, "A newcomer's run")."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from tests.conftest import ROOT, TINY

TRAIN_STEP = re.compile(r"progress: epoch (\d+)/(\d+) train step (\d+)/(\d+) \((\d+)%\), epoch (\d+):(\d\d) elapsed, "
                        r"ETA (\d+):(\d\d); run step (\d+)/(\d+), ETA (\d+):(\d\d)")
TEST_BATCH = re.compile(r"progress: final audit \(test split\): batch (\d+)/(\d+) \((\d+)%\), .* elapsed, ETA \d+:\d\d")


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "progress"]


def test_progress_lines_name_the_step_total_and_eta(caplog) -> None:
    """A Lightning run with the callback, a line after each batch (interval ~0): training steps of
    every epoch with step/total, elapsed and ETA; the test loop's batches too."""
    from cxr_relink.callbacks.progress import Progress

    torch.manual_seed(0)
    trainer = Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, limit_test_batches=3,
                      callbacks=[Progress(1e-9)], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    model = BoringModel()
    with caplog.at_level(logging.INFO, logger="progress"):
        trainer.fit(model)
        trainer.test(model, verbose=False)
    msgs = _messages(caplog)
    steps = [tuple(int(x) for x in m.groups()) for m in map(TRAIN_STEP.search, msgs) if m]
    assert [(e, E, s, S, pct) for e, E, s, S, pct, *_ in steps] == \
        [(e, 2, s, 4, round(100 * s / 4)) for e in (1, 2) for s in (1, 2, 3, 4)]
    assert [run_step for *_, run_step, run_total, _m, _s in steps] == list(range(1, 9))
    assert {run_total for *_, run_total, _m, _s in steps} == {8}
    tests = [tuple(int(x) for x in m.groups()) for m in map(TEST_BATCH.search, msgs) if m]
    assert tests == [(1, 3, 33), (2, 3, 67), (3, 3, 100)]


def test_eta_is_the_remaining_steps_at_the_mean_step_time(monkeypatch) -> None:
    """The ETA arithmetic against a fake clock: 3 of 10 steps in 30 s -> 70 s left."""
    from cxr_relink.callbacks import progress as P

    now = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])

    class T:
        max_epochs, current_epoch, num_training_batches = 4, 1, 10
        estimated_stepping_batches, global_step = 40, 13

    cb = P.Progress(30)
    cb._fit_start, cb._fit_step0 = 0.0, 0  # 13 steps in 130 s: 27 left at 10 s each
    cb._phase_start = 70.0
    now[0] = 130.0
    line = cb.train_line(T, batch_idx=2)
    assert line == "epoch 2/4 train step 3/10 (30%), epoch 1:00 elapsed, ETA 2:20; run step 13/40, ETA 4:30 " \
                   "(validation included so far)"


@pytest.mark.slow
def test_heartbeat_reports_a_long_block(caplog) -> None:
    """A stretch outside the Trainer's hooks (cohort generation, writing the bundle): "still ..." lines
    from a background thread while the block runs, none after it ends; also where the `train` loggers
    are quieted (the reproduction)."""
    from cxr_relink.callbacks.progress import heartbeat

    quiet = logging.getLogger("train")  # as experiments/reproduce/cli.py quiets train.py's own loggers
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.INFO, logger="progress"):
            with heartbeat("generating the cohort", 1.0):
                time.sleep(2.6)
            n = len(_messages(caplog))
            time.sleep(1.2)
    finally:
        quiet.setLevel(level)
    msgs = _messages(caplog)
    assert len(msgs) == n >= 2
    assert all(re.fullmatch(r"progress: still generating the cohort \(0:0\d so far\)", m) for m in msgs)


def test_config_changes_lists_each_changed_key() -> None:
    from cxr_relink.callbacks.run_config import config_changes

    saved = {"trainer": {"max_epochs": 2, "devices": 1}, "model": {"lr": 1e-3}, "ckpt_path": None, "gone": 1}
    now = {"trainer": {"max_epochs": 6, "devices": 1}, "model": {"lr": 1e-3}, "ckpt_path": "x.ckpt", "new": {"a": 1}}
    assert config_changes(saved, now) == [("gone", 1, "(absent)"), ("new.a", "(absent)", 1),
                                          ("trainer.max_epochs", 2, 6)]


@pytest.mark.slow
def test_resume_logs_each_changed_key(compose_train, tmp_path, caplog) -> None:
    """A run of 1 epoch, resumed from its checkpoint with max_epochs=2 and another learning rate:
    the resume names both changes (and nothing else) against the checkpoint's saved config."""
    from train import train

    ck = ["final_audit=false", "callbacks=none", "logger=none", "+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint",
          f"+callbacks.ckpt.dirpath={tmp_path}/ck", "+callbacks.ckpt.save_last=true", "trainer.limit_val_batches=1"]
    train(compose_train("trainer.max_epochs=1", *ck))
    ckpt = tmp_path / "ck" / "last.ckpt"
    with caplog.at_level(logging.INFO, logger="train.resume"):
        train(compose_train("trainer.max_epochs=2", "model.optimizer.lr=0.002", *ck, f"ckpt_path={ckpt}"))
    (said,) = [r.getMessage() for r in caplog.records if r.name == "train.resume"]
    changed = re.findall(r"^  (\S+): (.*) -> (.*)$", said, flags=re.M)
    assert sorted(changed) == [("model.optimizer.lr", "0.0003", "0.002"), ("trainer.max_epochs", "1", "2")]


@pytest.mark.slow
def test_log_file_and_redirected_stdout_carry_progress(tmp_path, cache_dir) -> None:
    """`python train.py > file`: the run's train.log and the redirected stdout both hold progress
    lines for the training steps and the final audit's test loop."""
    run = tmp_path / "run"
    out = tmp_path / "stdout.txt"
    argv = [sys.executable, "train.py", f"hydra.run.dir={run}", "logger=csv", "progress_every_s=1e-9",
            *[o for o in TINY if not o.startswith("trainer.max_epochs")], "trainer.max_epochs=1",
            "callbacks.relinkage_audit.n_boot=10", "~callbacks.linear_probe"]
    with out.open("w") as f:
        p = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300,
                           env={**os.environ, "CXR_RELINK_CACHE": str(cache_dir)})
    assert p.returncode == 0, out.read_text()[-3000:]
    for text in ((run / "train.log").read_text(), out.read_text()):
        steps = [m.group(3, 4) for m in TRAIN_STEP.finditer(text)]
        assert steps == [("1", "3"), ("2", "3"), ("3", "3")]
        assert TEST_BATCH.search(text)


def test_on_a_terminal_with_the_bar_the_lines_go_to_the_log_file_only(tmp_path) -> None:
    """Lightning's bar redraws a terminal line (a log line under it breaks it): with the bar shown, a
    terminal handler gets no progress line, the run's log file gets them all."""
    import io

    from cxr_relink.callbacks.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    term, file = logging.StreamHandler(Terminal()), logging.FileHandler(tmp_path / "train.log")
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(term)
    root.addHandler(file)
    try:
        trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[Progress(1e-9)],
                          logger=False, enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False)
        trainer.fit(BoringModel())
    finally:
        root.removeHandler(term)
        root.removeHandler(file)
        root.setLevel(level)
        file.close()
    logged = (tmp_path / "train.log").read_text()
    assert [m.group(3) for m in TRAIN_STEP.finditer(logged)] == ["1", "2", "3"]
    assert "progress:" not in term.stream.getvalue()
