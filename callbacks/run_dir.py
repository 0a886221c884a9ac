"""One run, one folder: a Hydra callback that refuses to start a run in a folder another run wrote.

Two runs given the same ``hydra.run.dir`` would otherwise interleave their logs, checkpoints and
audits, and the second would silently overwrite the first's ``.hydra/config.yaml``. The check runs in
``on_run_start``, before Hydra creates the folder or writes anything into it.

The one exception is resuming training in place: ``python train.py hydra.run.dir=<run>
ckpt_path=<run>/checkpoints/last.ckpt`` continues the run in its own folder (ModelCheckpoint keeps
its best-k bookkeeping only when the folder is unchanged). The earlier ``.hydra/`` is then kept as
``.hydra.before_resume_<k>`` so the original overrides are not lost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def check_run_dir(run_dir: str | Path, resume_ckpt: str | Path | None = None) -> None:
    """Raise if ``run_dir`` already holds files, unless ``resume_ckpt`` lies inside it (resume in
    place; the earlier ``.hydra/`` is then renamed, never overwritten)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
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
    raise FileExistsError(
        f"run directory {run_dir} already holds another run's outputs "
        f"({', '.join(sorted(p.name for p in run_dir.iterdir())[:5])}); a second run there would interleave "
        "with it. Choose a new hydra.run.dir (the default is timestamped), delete the old one, or resume "
        f"training in place with ckpt_path={run_dir}/checkpoints/last.ckpt"
    )


class RunDirGuard(Callback):
    """``check_run_dir`` on ``hydra.run.dir`` before a single run starts (multiruns get one
    numbered subfolder per job from Hydra). ``resume_key``: the config key naming a checkpoint
    that may resume in place (train.py: ckpt_path; evaluate.py: none, its ckpt_path is the model
    it audits)."""

    def __init__(self, resume_key: str | None = None) -> None:
        self.resume_key = resume_key

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        resume = config.get(self.resume_key) if self.resume_key else None
        try:
            check_run_dir(config.hydra.run.dir, resume)
        except FileExistsError as e:
            # Hydra turns a callback's exceptions into warnings and runs on; SystemExit is not an
            # Exception, so it stops the run before Hydra writes anything (exit status 1).
            raise SystemExit(f"Error: {e}") from None
