"""One log line per epoch, for output that is not a terminal (a log file, nohup, Slurm).

Lightning's progress bar redraws one terminal line; written to a file it leaves nothing readable
until the run ends. ``EpochLine`` logs, at the end of every training epoch (after its validation),

    epoch 3/6  train/loss 2.7114  val/loss 2.4930  val/i2t_acc 0.1667  audit/i2t/R@1/N=100 0.1230  (41.2 s)

the epoch's training loss, every ``val/`` metric logged so far, the ``watch`` metrics that exist
(train.py: the optimised metric, the probe's AUROC, DP's epsilon) and the epoch's wall time,
validation included. By default only when stderr is not a terminal (the bar shows progress there).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Sequence

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger("train.progress")


class EpochLine(Callback):
    """``enabled``: None = when stderr is not a terminal; True / False = always / never."""

    def __init__(self, watch: Sequence[str] = (), enabled: bool | None = None) -> None:
        self.watch = [w for w in watch if w]
        self.enabled = (not sys.stderr.isatty()) if enabled is None else enabled
        self._start = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            log.info("%s", self.line(trainer))

    def line(self, trainer: Trainer) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        shown = {}
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            shown["train/loss"] = loss
        shown.update({k: v for k, v in metrics.items() if k.startswith("val/")})
        shown.update({k: metrics[k] for k in self.watch if k in metrics and k not in shown})
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{total}"]
        parts += [f"{k} {v:.4f}" if math.isfinite(v) else f"{k} {v}" for k, v in shown.items()]
        if self._start is not None:
            parts.append(f"({time.monotonic() - self._start:.1f} s)")
        return "  ".join(parts)
