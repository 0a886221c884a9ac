"""One run, one folder: a Hydra callback that refuses to start a run in a folder another run wrote.

Two runs given the same ``hydra.run.dir`` would otherwise interleave their logs, checkpoints and
audits, and the second would silently overwrite the first's ``.hydra/config.yaml``. The check runs in
``on_run_start``, before Hydra creates the folder or writes anything into it.

The one exception is resuming training in place: ``python train.py hydra.run.dir=<run>
ckpt_path=<run>/checkpoints/last.ckpt`` continues the run in its own folder (ModelCheckpoint keeps
its best-k bookkeeping only when the folder is unchanged). The earlier ``.hydra/`` is then kept as
``.hydra.before_resume_<k>`` so the original overrides are not lost.

Two runs started at the same moment into one empty folder would both pass that check, and two
resumes of one run are both "in place": so the run also holds an exclusive lock on
``<run>/.run.lock`` (``flock``) for its lifetime, and a second process that finds it held is refused.
The kernel drops the lock when the process ends, however it ends (SIGKILL included), so a killed run
can be resumed at once. (Local file systems; Lightning's DDP worker processes, which rerun the script
into rank 0's folder, are left to rank 0.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
_HELD: list = []  # the open lock files: held until the process exits


def lock_run_dir(run_dir: str | Path):
    """Create ``run_dir`` and take the exclusive lock on ``run_dir/.run.lock``; raise if another
    live process holds it. Returns the open lock file (the lock lasts as long as it stays open)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the emptiness check alone
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise FileExistsError(
            f"run directory {run_dir} is in use by another running process (it holds {run_dir / LOCK_NAME}); "
            "two runs there would interleave. Wait for it to end (or stop it), or choose a new hydra.run.dir"
        ) from None
    return f


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK"))


def check_run_dir(run_dir: str | Path, resume_ckpt: str | Path | None = None) -> None:
    """Raise if ``run_dir`` already holds files, unless ``resume_ckpt`` lies inside it (resume in
    place; the earlier ``.hydra/`` is then renamed, never overwritten)."""
    run_dir = Path(run_dir)
    held = [p.name for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []
    if not held:
        return
    if resume_ckpt is not None:
        ckpt = Path(resume_ckpt).resolve()
        if run_dir.resolve() in ckpt.parents:
            old = run_dir / ".hydra"
            if old.is_dir():
                k = 1
                while (run_dir / f".hydra.before_resume_{k}").exists():
                    k += 1
                old.rename(run_dir / f".hydra.before_resume_{k}")
            log.info("resuming in %s from %s", run_dir, ckpt)
            return
    # Resuming is offered only where there is something to resume (a run's last.ckpt).
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = f", or resume training in place with ckpt_path={last}" if last.exists() else ""
    raise FileExistsError(
        f"run directory {run_dir} already holds another run's outputs "
        f"({', '.join(sorted(held)[:5])}); a second run there would interleave "
        f"with it. Choose a new hydra.run.dir (the default is timestamped to the microsecond), delete the old one{resume}"
    )


class RunDirGuard(Callback):
    """``check_run_dir`` on ``hydra.run.dir`` before a single run starts (multiruns get one
    numbered subfolder per job from Hydra), then the folder's lock for the rest of the process
    (``lock_run_dir``). ``resume_key``: the config key naming a checkpoint
    that may resume in place (train.py: ckpt_path; evaluate.py: none, its ckpt_path is the model
    it audits)."""

    def __init__(self, resume_key: str | None = None) -> None:
        self.resume_key = resume_key

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_rank_zero():
            return
        run_dir = Path(config.hydra.run.dir)
        resume = config.get(self.resume_key) if self.resume_key else None
        try:
            if not (resume and run_dir.resolve() in Path(resume).resolve().parents):
                check_run_dir(run_dir)  # a used folder is refused before anything is written into it
            _HELD.append(lock_run_dir(run_dir))
            check_run_dir(run_dir, resume)  # again under the lock (a run that started meanwhile)
        except FileExistsError as e:
            # Hydra turns a callback's exceptions into warnings and runs on; SystemExit is not an
            # Exception, so it stops the run before Hydra writes anything (exit status 1).
            raise SystemExit(f"Error: {e}") from None
