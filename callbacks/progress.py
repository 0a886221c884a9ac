"""Progress in log files: one line per epoch (EpochLine) and a line every ~30 s (Progress, heartbeat).

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
# The ~30 s progress lines: a top-level logger of their own, so that a program that quiets train.py's
# loggers (experiments/reproduce/cli.py sets `train` to WARNING: one line per run) still shows them.
plog = logging.getLogger("progress")


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


def _clock(seconds: float) -> str:
    """1:05 (m:ss) or 1:02:03 (h:mm:ss)."""
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _total(n) -> int | None:
    """A batch count Lightning reports (an int, inf or a list per dataloader) as an int, or None."""
    if isinstance(n, (list, tuple)):
        n = sum(n) if n else None
    return int(n) if n is not None and math.isfinite(n) and n > 0 else None


class _FileOnlyOnATerminal(logging.Filter):
    """On a terminal Lightning's progress bar shows the same (and a line written under it breaks it):
    the Trainer's progress lines go to log files only there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "beside_bar", False)


def _quiet_terminal_handlers() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
            continue
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "isatty", lambda: False)() and \
                not any(isinstance(f, _FileOnlyOnATerminal) for f in handler.filters):
            handler.addFilter(_FileOnlyOnATerminal())


class Progress(Callback):
    """A progress line every ``interval_s`` seconds of wall time (python logging, so it reaches
    ``<run>/<task>.log`` and any redirected stdout), for the long stretches where EpochLine says
    nothing: training steps, validation and the final audit's test loop, each with what is done,
    the time elapsed and an ETA, e.g.

        progress: epoch 2/6 train step 120/400 (30%), epoch 0:45 elapsed, ETA 1:45; run step 520/2400, ETA 11:30

    Lines are written from the batch hooks when the interval has passed; a background thread covers
    a long stretch without batches (one slow step, the audit computed after the test loop) with a
    "still ..." line. On a terminal with Lightning's progress bar shown the lines go to log files only.
    ``enabled=False`` (train.py: progress_every_s=0): nothing."""

    def __init__(self, interval_s: float = 30.0, enabled: bool = True, test_what: str = "final audit (test split)") -> None:
        self.interval_s = float(interval_s)
        self.enabled = enabled
        self.test_what = test_what  # how the test loop is named (evaluate.py: "audit (<split> split)")
        self._last = time.monotonic()
        self._status = ""
        self._since = time.monotonic()
        self._phase_start = time.monotonic()
        self._fit_start: float | None = None
        self._fit_step0 = 0
        self._stop = None
        self._thread = None
        self._bar = False  # whether a progress bar is shown (then: log files only, on a terminal)

    # ---------------------------------------------------------------- output
    def _emit(self, text: str) -> None:
        self._last = time.monotonic()
        plog.info("progress: %s", text, extra={"beside_bar": self._bar})

    def _due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    def _set(self, status: str) -> None:
        """What the thread reports if nothing else is logged for an interval."""
        self._status, self._since = status, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(max(self.interval_s / 3, 1.0)):
            if self._status and self._due():
                self._emit(f"{self._status} ({_clock(time.monotonic() - self._since)} so far)")

    def _start_thread(self) -> None:
        import threading

        if not self.enabled or self.interval_s <= 0 or self._thread is not None:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress-heartbeat", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._bar = trainer.progress_bar_callback is not None
        if self._bar:
            _quiet_terminal_handlers()
        if trainer.is_global_zero:
            self._last = time.monotonic()
            self._start_thread()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop_thread()
        self._status = ""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_thread()

    # ---------------------------------------------------------------- training
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start, self._fit_step0 = time.monotonic(), int(trainer.global_step)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._phase_start = time.monotonic()
        total = _total(trainer.num_training_batches)
        self._set(f"{self._epoch(trainer)} training, in step 1" + (f"/{total}" if total else ""))

    def _epoch(self, trainer: Trainer) -> str:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch + 1}{total}"

    def train_line(self, trainer: Trainer, batch_idx: int) -> str:
        done, total = batch_idx + 1, _total(trainer.num_training_batches)
        elapsed = time.monotonic() - self._phase_start
        text = f"{self._epoch(trainer)} train step {done}"
        if total:
            text += f"/{total} ({100 * done / total:.0f}%), epoch {_clock(elapsed)} elapsed, " \
                    f"ETA {_clock(elapsed / done * (total - done))}"
        else:
            text += f", epoch {_clock(elapsed)} elapsed"
        run_total = _total(trainer.estimated_stepping_batches) if trainer.max_epochs and trainer.max_epochs > 0 else None
        step = int(trainer.global_step)
        if run_total and self._fit_start is not None and step > self._fit_step0:
            run_elapsed = time.monotonic() - self._fit_start
            eta = run_elapsed / (step - self._fit_step0) * max(run_total - step, 0)
            text += f"; run step {step}/{run_total}, ETA {_clock(eta)} (validation included so far)"
        return text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        total = _total(trainer.num_training_batches)
        if total is None or batch_idx + 1 < total:
            self._set(f"{self._epoch(trainer)} training, in step {batch_idx + 2}" + (f"/{total}" if total else ""))
        if self._due():
            self._emit(self.train_line(trainer, batch_idx))

    # ---------------------------------------------------------------- validation / test
    def _eval_start(self, trainer: Trainer, what: str) -> None:
        self._phase_start = time.monotonic()
        self._set(what)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_start(trainer, f"{self._epoch(trainer)} validation")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, self.test_what)

    def eval_line(self, trainer: Trainer, what: str, batch_idx: int, total) -> str:
        done, total = batch_idx + 1, _total(total)
        elapsed = time.monotonic() - self._phase_start
        text = f"{what}: batch {done}" + (f"/{total} ({100 * done / total:.0f}%)" if total else "")
        text += f", {_clock(elapsed)} elapsed"
        if total:
            text += f", ETA {_clock(elapsed / done * (total - done))} (encoding; the audit follows)"
        return text

    def _eval_batch(self, trainer: Trainer, what: str, batch_idx: int, total) -> None:
        if not (self.enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        if self._due():
            self._emit(self.eval_line(trainer, what, batch_idx, total))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, f"{self._epoch(trainer)} validation", batch_idx, trainer.num_val_batches)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, self.test_what, batch_idx, trainer.num_test_batches)

    # The audits run in the epoch-end hooks of the callbacks after this one (train.py puts it first):
    # the thread reports them.
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._set(f"{self._epoch(trainer)} validation done, audits running")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(f"{self.test_what}: split encoded, computing the audit")


class heartbeat:
    """``with heartbeat("preparing the data"):`` logs "progress: still preparing the data (0:30 so
    far)" every ``interval_s`` seconds until the block ends (a background thread; python logging, so
    files and the terminal get it): for stretches outside the Trainer's hooks (generating a cohort, writing the final
    bundle). ``interval_s`` <= 0: nothing."""

    def __init__(self, what: str, interval_s: float = 30.0) -> None:
        self.what, self.interval_s = what, float(interval_s)
        self._stop = self._thread = None

    def _run(self, start: float) -> None:
        while not self._stop.wait(max(self.interval_s, 1.0)):
            plog.info("progress: still %s (%s so far)", self.what, _clock(time.monotonic() - start))

    def __enter__(self) -> "heartbeat":
        import threading

        if self.interval_s > 0:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(time.monotonic(),), daemon=True,
                                            name="progress-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
