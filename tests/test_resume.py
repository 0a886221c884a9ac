"""Interrupt and resume, and one run per folder, end to end through the CLI (subprocesses).

A run is stopped mid-epoch by SIGINT, resumed in place (``hydra.run.dir=<run>
ckpt_path=<run>/checkpoints/last.ckpt``), stopped again mid-epoch by SIGKILL, resumed again and
finished. With ``trainer.deterministic=true`` its final audit, its best-checkpoint bookkeeping and
its checkpoints must equal those of the same command run without interruption (the independent
reference), in the same folder and the same (offline) W&B run. A second run into a used folder is
refused and leaves the first run's outputs as they were.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from cxr_relink.callbacks.run_dir import check_run_dir, lock_run_dir
from cxr_relink.models.checkpoint import load_checkpoint_dict
from tests.conftest import ROOT, TINY

# Every test here shares one module fixture that trains, interrupts and resumes real runs (minutes): the slow tier.
pytestmark = pytest.mark.slow

# Three short epochs; the audits with few bootstrap draws (they are not what is tested here).
RUN = [*TINY, "trainer.max_epochs=3", "trainer.deterministic=true", "callbacks.relinkage_audit.n_boot=10",
       "callbacks.linear_probe.n_boot=10", "callbacks.linear_probe.max_train_samples=64",
       "callbacks.linear_probe.every_n_epochs=1"]  # every epoch: each one's probe must survive the resume
TIMEOUT = 240


class PauseAt(Callback):
    """Test hook (added with ``+callbacks.pause=...``): at the start of training batch ``batch`` of
    ``epoch``, write ``marker`` and wait there to be signalled, so the kill lands mid-epoch, after
    the previous epoch's checkpoint, at a known place."""

    def __init__(self, epoch: int, batch: int, marker: str) -> None:
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            Path(self.marker).write_text(f"{trainer.current_epoch} {batch_idx}")
            while True:
                time.sleep(0.05)


def train_cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *RUN, *extra]


def run_to_end(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cli(run_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def stop_mid_epoch(run_dir: Path, sig: int, epoch: int, *extra: str, while_paused=None) -> str:
    """Start the command, wait until it is inside ``epoch`` (batch 1 of 3), call ``while_paused()``,
    send ``sig``; the process's output."""
    marker = run_dir.parent / f"{run_dir.name}.paused"
    marker.unlink(missing_ok=True)
    hook = [f"+callbacks.pause._target_={__name__}.PauseAt", f"+callbacks.pause.epoch={epoch}",
            "+callbacks.pause.batch=1", f"+callbacks.pause.marker={marker}"]
    # A shell's background job (`cmd &`, nohup) ignores SIGINT and children inherit that, so Python would never
    # raise KeyboardInterrupt in the run: give the run the default disposition back.
    p = subprocess.Popen(train_cli(run_dir, *extra, *hook), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"never reached epoch {epoch}:\n{p.communicate()[0][-4000:]}")
        time.sleep(0.1)
    if while_paused is not None:
        while_paused()
    p.send_signal(sig)
    out, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0, out[-3000:]
    return out


def checkpoint_bookkeeping(path: Path) -> dict:
    """What ModelCheckpoint keeps about the best checkpoints (from the checkpoint file)."""
    ck = load_checkpoint_dict(path)
    state = next(v for k, v in ck["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"] == "val/loss")
    return {"best": Path(state["best_model_path"]).name, "score": float(state["best_model_score"]),
            "k": sorted((Path(p).name, round(float(s), 6)) for p, s in state["best_k_models"].items()),
            "epoch": ck["epoch"], "step": ck["global_step"]}


def wandb_ids(run_dir: Path) -> list[str]:
    """The run id of every offline W&B run folder (``offline-run-<time>-<id>[-<n>]``)."""
    return sorted(d.name.split("-")[3] for d in (run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("resume")
    reference, resumed = root / "reference", root / "resumed"
    run_to_end(reference)  # first: also generates the cohort into the shared cache
    resume = f"ckpt_path={resumed}/checkpoints/last.ckpt"
    sigint = stop_mid_epoch(resumed, signal.SIGINT, 1)
    after_sigint = sorted(p.name for p in resumed.iterdir())
    concurrent = {}

    def resume_again_meanwhile():  # a second resume of the same run while the first is running
        concurrent["before"] = sorted(p.name for p in resumed.iterdir())
        concurrent["proc"] = subprocess.run(train_cli(resumed, resume), cwd=ROOT, capture_output=True, text=True,
                                            timeout=TIMEOUT)
        concurrent["after"] = sorted(p.name for p in resumed.iterdir())

    stop_mid_epoch(resumed, signal.SIGKILL, 2, resume, while_paused=resume_again_meanwhile)
    run_to_end(resumed, resume)
    return reference, resumed, sigint, after_sigint, concurrent


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(runs) -> None:
    reference, resumed, *_ = runs
    want = json.loads((reference / "final_audit" / "audit.json").read_text())
    got = json.loads((resumed / "final_audit" / "audit.json").read_text())
    for key in ("relinkage", "probe"):
        assert got[key] == want[key], key
    assert {k: got["meta"].get(k) for k in ("checkpoint", "epoch", "checkpoint_selection")} == \
        {k: want["meta"].get(k) for k in ("checkpoint", "epoch", "checkpoint_selection")}
    # "best" bookkeeping survived both interruptions: same best checkpoint, score and top-k.
    assert checkpoint_bookkeeping(resumed / "checkpoints" / "last.ckpt") == \
        checkpoint_bookkeeping(reference / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints").iterdir())
    # The selected checkpoint may be an early epoch: the later epochs must match too. Every epoch's
    # validation audit, once each and with the same numbers, and the final weights, bit for bit.
    names = sorted(p.name for p in (reference / "audit").glob("*.json"))
    assert len(names) == 6 and sorted(p.name for p in (resumed / "audit").glob("*.json")) == names
    for name in names:
        want, got = (json.loads((r / "audit" / name).read_text()) for r in (reference, resumed))
        assert {k: got.get(k) for k in ("relinkage", "probe")} == {k: want.get(k) for k in ("relinkage", "probe")}, name
    want, got = (load_checkpoint_dict(r / "checkpoints" / "last.ckpt")["state_dict"] for r in (reference, resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_continues_the_same_folder_and_wandb_run(runs) -> None:
    reference, resumed, *_ = runs
    ids = wandb_ids(resumed)
    assert len(ids) == 3 and len(set(ids)) == 1, ids  # three legs, one W&B run
    assert (resumed / "wandb_run_id").read_text().strip() == ids[0]
    assert len(set(wandb_ids(reference))) == 1 and wandb_ids(reference) != ids
    # the earlier legs' Hydra configs are kept beside the last one
    assert {p.name for p in resumed.glob(".hydra*")} == {".hydra", ".hydra.before_resume_1", ".hydra.before_resume_2"}


def test_sigint_stops_without_auditing_and_says_how_to_resume(runs) -> None:
    _, resumed, out, after, _ = runs
    assert "final_audit" not in after  # an interrupted run does not pretend to have finished
    assert "interrupted" in out and f"ckpt_path={resumed}/checkpoints/last.ckpt" in out, out[-3000:]


def test_second_run_into_a_used_folder_is_refused_and_leaves_it_intact(runs) -> None:
    reference = runs[0]
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    p = subprocess.run(train_cli(reference), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode != 0 and "already holds another run" in p.stderr
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before


def test_a_second_process_is_refused_while_the_run_is_alive(runs) -> None:
    """Two resumes of one run at once (both "in place"): the second is refused by the folder's lock,
    before it renames or writes anything."""
    c = runs[4]
    assert c["proc"].returncode != 0 and "in use by another running process" in c["proc"].stderr, c["proc"].stderr[-2000:]
    assert c["after"] == c["before"]


def test_run_dir_lock_is_exclusive_and_released_on_close(tmp_path) -> None:
    run = tmp_path / "run"
    first = lock_run_dir(run)
    with pytest.raises(FileExistsError, match="in use by another running process"):
        lock_run_dir(run)  # a second open file description: as another process would see it
    check_run_dir(run)  # the lock file alone is not "another run's outputs"
    first.close()
    lock_run_dir(run).close()
