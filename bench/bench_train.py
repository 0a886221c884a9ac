"""Benchmark: where a training epoch of the default run goes, as ratios measured side by side.

    .venv/bin/python -m bench.bench_train            # the default run's model, data and batch
    .venv/bin/python -m bench.bench_train --quick    # smoke run: tiny cohort, a few steps (seconds)
    .venv/bin/python -m bench.bench_train data.num_workers=1   # any train.py override

One process, one composed config (configs/train.yaml, as `python train.py` composes it), one model
initialisation, one DataLoader:

(a) a bare PyTorch loop over the datamodule's train DataLoader: both towers forward, ClipLoss,
    backward, gradient clipping, AdamW + warm-up/cosine step, logit-scale clamp;
(b) Lightning ``Trainer.fit`` for the same number of steps with the project's LightningModule and the
    trainer config of the default run (progress bar, logging every n steps to a CSV logger), without
    audits, checkpoints or validation. (a) and (b) alternate ``--repeats`` times; the ratio is the
    minimum over repeats of each, which a shared machine's noise can only inflate;
(c) one full epoch as train.py runs it (audit callbacks, checkpoint, learning-rate monitor; CSV
    logger instead of W&B): the training part vs the validation part (validation forward, re-linkage
    audit, linear probe, their JSON/plot writing) and the checkpoint, with the per-callback breakdown;
(d) embedding extraction over an un-augmented split (``eval_dataloader``): the loader alone,
    ``encode_images`` alone on preloaded batches, and the two together (images/s, and images per
    CPU-second of this process: one core's throughput).

Prints the machine line, a breakdown and one table of ratios against the goals of issue 12.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# As tests/conftest.py (and the recommended train.py default): idle OpenMP threads sleep, so the
# ratios stay measurable on a shared machine; set OMP_WAIT_POLICY (e.g. ACTIVE) to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from bench.machine import describe  # noqa: E402

QUICK = [
    "data.reader.num_patients=60",
    "data.reader.image_size=32",
    "data.image_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "callbacks.linear_probe.max_train_samples=64",
]


class Clock:
    """Wall and CPU (this process) seconds of a block, accumulated under a name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self.wall.setdefault(name, 0.0)  # rows in the order the blocks start
        self.cpu.setdefault(name, 0.0)
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - w
            self.cpu[name] += time.process_time() - c

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a, **kw):
            with self(name):
                return fn(*a, **kw)

        return timed


def build(overrides: list[str], out_dir: str):
    """The composed train config, its datamodule (set up) and one model initialisation."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from cxr_relink.configs import compose

    cfg = compose("train.yaml", ["logger=csv", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = out_dir
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, tokenizer=dm.tokenizer)
    return cfg, dm, model


def bare_loop(model, cfg, loader, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``steps`` plain PyTorch training steps over ``loader``."""
    from hydra.utils import instantiate

    from cxr_relink.models.losses import ClipLoss
    from cxr_relink.models.optim import warmup_cosine

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "logit_scale" in n)]
    opt = instantiate(cfg.model.optimizer)(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    sched_kw = {k: v for k, v in cfg.model.scheduler.items() if not k.startswith("_")}
    sched = warmup_cosine(opt, total_steps=steps, **sched_kw)
    loss_fn = ClipLoss(local_loss=cfg.model.local_loss)
    clip = cfg.trainer.get("gradient_clip_val")
    model.train()
    w, c = time.perf_counter(), time.process_time()
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        img = model.encode_images(batch["image"])
        txt = model.encode_reports(batch["input_ids"], batch["attention_mask"])
        loss = loss_fn(img, txt, model.logit_scale.exp(), group_ids=batch["study_idx"])["contrastive_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, model.max_logit_scale)
    return time.perf_counter() - w, time.process_time() - c


class EpochTimer(Callback):
    """Timestamps (wall, CPU) of the training part of an epoch, its validation and what follows.

    Lightning calls callbacks in list order (checkpoint callbacks moved to the end): this one goes
    first and its ``last`` twin after the audits, so the spans hold neither the checkpoint save
    (timed on the ModelCheckpoint itself) nor each other."""

    def __init__(self, marks: dict | None = None, is_last: bool = False) -> None:
        self.t: dict[str, tuple[float, float]] = {} if marks is None else marks
        self.is_last = is_last

    def last(self) -> "EpochTimer":
        return EpochTimer(self.t, is_last=True)

    def _mark(self, name: str) -> None:
        self.t[name] = (time.perf_counter(), time.process_time())

    def on_train_epoch_start(self, *a) -> None:
        if not self.is_last:
            self._mark("epoch_start")

    def on_validation_start(self, *a) -> None:
        if not self.is_last:
            self._mark("val_start")

    def on_validation_end(self, *a) -> None:
        if not self.is_last:
            self._mark("val_end")

    def on_train_epoch_end(self, *a) -> None:
        if self.is_last:
            self._mark("epoch_end")

    def span(self, a: str, b: str) -> tuple[float, float]:
        return self.t[b][0] - self.t[a][0], self.t[b][1] - self.t[a][1]


def lightning_fit(model, cfg, dm, steps: int, out_dir: str, callbacks: list | None = None, validate: bool = False):
    """Trainer.fit for one epoch of ``steps`` steps with the default run's trainer config."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    timer = EpochTimer()
    trainer = instantiate(
        cfg.trainer, max_epochs=1, limit_train_batches=steps, limit_val_batches=None if validate else 0,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks or []),
        enable_model_summary=False, default_root_dir=out_dir,
        logger=CSVLogger(out_dir, name="csv"), callbacks=[timer, *(callbacks or []), timer.last()],
    )
    w, c = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=dm)
    return timer, (time.perf_counter() - w, time.process_time() - c)


def extraction(model, dm, split: str, limit: int, clock: Clock) -> dict[str, Any]:
    """Images/s of the loader alone, encode_images alone and both, over ``split`` (un-augmented)."""
    model.eval()
    with clock("loader alone"):
        batches, n = [], 0
        for b in dm.eval_dataloader(split):
            batches.append(b["image"])
            n += b["image"].shape[0]
            if n >= limit:
                break
    with torch.inference_mode():
        model.encode_images(batches[0][:8])  # warm-up
        with clock("encode alone"):
            for x in batches:
                model.encode_images(x)
        with clock("loader + encode"):
            m = 0
            for b in dm.eval_dataloader(split):
                model.encode_images(b["image"])
                m += b["image"].shape[0]
                if m >= limit:
                    break
    return {"images": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="train.py overrides (Hydra syntax)")
    ap.add_argument("--quick", action="store_true", help="tiny cohort at 32^2, 3 steps: a smoke run")
    ap.add_argument("--steps", type=int, default=None, help="steps per (a)/(b) run (default: one epoch)")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of (a) and (b)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    ap.add_argument("--extract-split", default="train", help="split encoded in (d) (the largest by default)")
    ap.add_argument("--extract-images", type=int, default=100_000, help="at most this many images in (d)")
    args = ap.parse_args()
    overrides = (QUICK if args.quick else []) + args.overrides
    repeats = 1 if args.quick else args.repeats

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "datamodules"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from hydra.utils import instantiate

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_train {' '.join(sys.argv[1:])}")
    print(f"# machine: {describe()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    cfg, dm, model = build(overrides, tmp)
    loader = dm.train_dataloader()
    steps = min(args.steps or len(loader), len(loader))
    if args.quick:
        steps = min(steps, 3)
    init = copy.deepcopy(model.state_dict())
    print(f"# data: {len(dm.studies('train'))} train studies, {len(dm.dataset('train', True))} images, batch "
          f"{dm.batch_size}, {steps} steps; num_workers {dm.num_workers}; model {sum(p.numel() for p in model.parameters()):,} params")

    # Warm-up (oneDNN kernel selection, allocator, first Trainer): not timed.
    warm = copy.deepcopy(model)
    bare_loop(warm, cfg, dm.train_dataloader(), min(steps, 3))
    lightning_fit(warm, cfg, dm, min(steps, 3), os.path.join(tmp, "warm"))
    del warm

    # (a) vs (b), alternating; fresh copies of one initialisation.
    bare, light, fit_total = [], [], []
    for r in range(repeats):
        m_bare = copy.deepcopy(model)
        m_bare.load_state_dict(init)
        bare.append(bare_loop(m_bare, cfg, dm.train_dataloader(), steps))
        m_light = copy.deepcopy(model)
        m_light.load_state_dict(init)
        timer, total = lightning_fit(m_light, cfg, dm, steps, os.path.join(tmp, f"light{r}"))
        light.append(timer.span("epoch_start", "epoch_end"))
        fit_total.append(total)
        print(f"  repeat {r}: bare {bare[-1][0]:.2f} s wall / {bare[-1][1]:.2f} s CPU; Lightning epoch {light[-1][0]:.2f} s "
              f"wall / {light[-1][1]:.2f} s CPU (Trainer.fit total {total[0]:.2f} s)", flush=True)
    t_bare, t_light = min(b[0] for b in bare), min(x[0] for x in light)
    c_bare, c_light = min(b[1] for b in bare), min(x[1] for x in light)

    # (c) one epoch as train.py runs it: audit callbacks, checkpoint, lr monitor (CSV logger).
    clock = Clock()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    for cb in callbacks:
        name = type(cb).__name__
        if hasattr(cb, "run_audit"):
            total = f"{name}.run_audit" + (" (= the two rows below)" if hasattr(cb, "encode_train") else "")
            cb.run_audit = clock.wrap(total, cb.run_audit)
            cb.write = clock.wrap(f"{name}.write (JSON, plot)", cb.write)
        if name == "ModelCheckpoint":  # saves in one of these two hooks, depending on the validation cadence
            cb.on_train_epoch_end = clock.wrap("ModelCheckpoint (save)", cb.on_train_epoch_end)
            cb.on_validation_end = clock.wrap("ModelCheckpoint (save)", cb.on_validation_end)
        if hasattr(cb, "encode_train"):
            cb.encode_train = clock.wrap(f"&nbsp;&nbsp;{name}.encode_train (load + encode train images)", cb.encode_train)
            cb.probe = clock.wrap(f"&nbsp;&nbsp;{name}.probe (fit, AUROC, bootstrap CI)", cb.probe)
    m_full = copy.deepcopy(model)
    m_full.load_state_dict(init)
    m_full.validation_step = clock.wrap("validation_step (both towers, val split)", m_full.validation_step)
    timer, _ = lightning_fit(m_full, cfg, dm, steps, os.path.join(tmp, "full"), callbacks=callbacks, validate=True)
    t_train = timer.span("epoch_start", "val_start")
    t_val = timer.span("val_start", "val_end")

    # (d) embedding extraction.
    ext_clock = Clock()
    ext = extraction(m_full, dm, args.extract_split, args.extract_images, ext_clock)
    n_img = ext["images"]

    print(f"\n## (c) one epoch as train.py runs it ({steps} steps)\n")
    print("| part | wall s | CPU s | share of the training part |\n|---|---:|---:|---:|")
    print(f"| training part (steps, data, logging) | {t_train[0]:.2f} | {t_train[1]:.2f} | 100% |")
    print(f"| validation (loop + audit callbacks) | {t_val[0]:.2f} | {t_val[1]:.2f} | {t_val[0] / t_train[0]:.1%} |")
    for name in [n for n in clock.wall if not n.startswith("ModelCheckpoint")]:
        print(f"| &nbsp;&nbsp;{name} | {clock.wall[name]:.2f} | {clock.cpu[name]:.2f} | {clock.wall[name] / t_train[0]:.1%} |")
    t_ckpt = clock.wall.get("ModelCheckpoint (save)", 0.0), clock.cpu.get("ModelCheckpoint (save)", 0.0)
    print(f"| checkpoint save (ModelCheckpoint), after validation | {t_ckpt[0]:.2f} | {t_ckpt[1]:.2f} | {t_ckpt[0] / t_train[0]:.1%} |")

    print(f"\n## (d) embedding extraction, split {args.extract_split!r}, {n_img:,} images, "
          f"eval batch {dm.eval_batch_size}, num_workers {dm.num_workers}\n")
    print("| path | wall s | images/s | images per CPU-second |\n|---|---:|---:|---:|")
    for name in ("loader alone", "encode alone", "loader + encode"):
        w, c = ext_clock.wall[name], ext_clock.cpu[name]
        print(f"| {name} | {w:.2f} | {n_img / w:,.0f} | {n_img / c:,.0f} |")

    load, enc, both = (ext_clock.wall[k] for k in ("loader alone", "encode alone", "loader + encode"))
    print("\n## ratios\n")
    print("| measure | value | goal |\n|---|---:|---|")
    print(f"| (b) Lightning epoch ÷ (a) bare loop, {steps} steps, wall (min of {repeats}) | {t_light / t_bare:.3f}× "
          f"({t_light / steps * 1000:.0f} vs {t_bare / steps * 1000:.0f} ms/step) | ≤ 1.1× |")
    print(f"| (b) ÷ (a), CPU time of this process (min of {repeats}) | {c_light / c_bare:.3f}× "
          f"({c_light / steps * 1000:.0f} vs {c_bare / steps * 1000:.0f} CPU-ms/step) | ≤ 1.1× |")
    print(f"| (c) validation + audits + probe ÷ training part of the epoch | {t_val[0] / t_train[0]:.1%} "
          f"({t_val[0]:.2f} s / {t_train[0]:.2f} s) | ≤ 10% |")
    # The probe runs on the epochs callbacks.audit.due_epoch picks: its share over the default run's
    # epochs, with the rest of validation every epoch.
    from cxr_relink.callbacks.audit import due_epoch

    probe_wall = sum(w for k, w in clock.wall.items() if k.startswith("LinearProbe.run_audit") or
                     k.startswith("LinearProbe.write"))
    epochs, every = int(cfg.trainer.max_epochs), int(cfg.callbacks.linear_probe.every_n_epochs or 0)
    due = sum(due_epoch(e, every, epochs) for e in range(1, epochs + 1))
    t_avg = t_val[0] - probe_wall + probe_wall * due / epochs
    print(f"| (c) the same averaged over the run's {epochs} epochs (probe on {due} of them: every "
          f"{every}th and the last) | {t_avg / t_train[0]:.1%} ({t_avg:.2f} s / {t_train[0]:.2f} s) | ≤ 10% |")
    print(f"| (c) checkpoint save ÷ training part | {t_ckpt[0] / t_train[0]:.1%} | — |")
    print(f"| (d) loader alone ÷ encode alone (time) | {load / enc:.2f} | < 1: the loader is not the bottleneck |")
    print(f"| (d) loader + encode ÷ encode alone | {both / enc:.2f}× ({n_img / both:,.0f} images/s) | → 1 |")


if __name__ == "__main__":
    main()
