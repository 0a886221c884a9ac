"""Train a model: `python train.py [model=llm_encoder] [experiment=...] [key=value ...]`.

The work is `train(cfg)`, which tests call with a composed config; `main()` is the Hydra entry point
and returns the metric a sweeper optimises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# W&B: offline unless the user says otherwise; never ask questions on a terminal. A run started by
# `wandb agent` (WANDB_SWEEP_ID set) must report to its sweep, so it keeps W&B's own (online) mode;
# the sweep files also pass logger.wandb.offline=false (configs/sweep/).
if not os.environ.get("WANDB_SWEEP_ID"):
    os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from cxr_relink import configs  # noqa: E402, F401  (sets CXR_RELINK_ROOT)
from cxr_relink.configs import cli  # noqa: E402
from cxr_relink.callbacks.console import quiet_known_warnings  # noqa: E402
from cxr_relink.callbacks.progress import EpochLine, Progress, heartbeat  # noqa: E402
from cxr_relink.callbacks.run_config import SaveRunConfig, log_resume_changes  # noqa: E402
from cxr_relink.callbacks.seed import EpochSeed  # noqa: E402

log = logging.getLogger("train")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Build every `_target_` entry of a config group (callbacks, loggers); empty/None -> []."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def count_parameters(module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"model/params_total": total, "model/params_trainable": trainable, "model/params_frozen": total - trainable}


def describe_llm_tower(model) -> str | None:
    """Which LLM the run trains (models/llm_encoder.py), in one line: by default it is no released LLM
    but a tiny Llama-style decoder built from the config and trained from scratch (docs/llm_tower.md)."""
    tower = next((m for m in model.modules() if type(m).__name__ == "BidirectionalLLMEncoder"), None)
    if tower is None:
        return None
    c = tower.base_model.config
    arch = f"{c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}"
    counts = tower.parameter_counts()
    if not tower.pretrained:
        return (f"LLM text tower: a tiny decoder LLM ({arch}) built from the config, randomly initialised and trained "
                f"from scratch in full ({counts['total']:,} parameters; no pretrained weights, no LoRA). For a "
                "real LLM: model.text_tower.pretrained=/local/dir (a local Hugging Face decoder checkpoint or a "
                "stage-1 output; LoRA then switches on) - docs/llm_tower.md")
    lora = tower.lora_settings
    how = (f"LoRA r={lora['r']} alpha={lora['alpha']} dropout={lora['dropout']} on {lora['target_modules']}"
           if tower.use_lora else "full finetune (use_lora=false)")
    return (f"LLM text tower: {tower.pretrained} ({arch}), {how}: {counts['trainable']:,} of "
            f"{counts['total']:,} parameters trained")


def log_run_config(cfg: DictConfig, model, loggers: list) -> None:
    """Log the resolved config under `cfg/` (W&B sweeps lock their swept keys in the run config,
    so our own copy lives under a prefix that cannot collide) and the parameter counts."""
    counts = count_parameters(model)
    log.info("parameters: %s", counts)
    for lg in loggers:
        lg.log_hyperparams({"cfg": OmegaConf.to_container(cfg, resolve=True), **counts})


def finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run (also after an error or an interruption, then marked failed) so
    consecutive sweep-agent runs never merge."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


# The W&B run id, kept in the run folder so that resuming continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id"


def continue_wandb_run(cfg: DictConfig) -> None:
    """Resuming (``ckpt_path``): log into the W&B run of the folder the checkpoint came from
    (``<run>/checkpoints/*.ckpt`` -> ``<run>/wandb_run_id``) with ``resume="allow"``, instead of
    starting a new run. Offline, W&B cannot check that the run exists: each leg is an offline folder
    with the same id and the resume intent recorded (docs/configs.md, Resume)."""
    ckpt = cfg.get("ckpt_path")
    id_file = Path(ckpt).resolve().parent.parent / WANDB_ID_FILE if ckpt else None
    if id_file is None or not id_file.exists():
        return
    for lg in (cfg.get("logger") or {}).values():
        if isinstance(lg, DictConfig) and str(lg.get("_target_", "")).endswith("WandbLogger") and not lg.get("id"):
            with open_dict(lg):
                lg.id, lg.resume = id_file.read_text().strip(), "allow"
            log.info("resuming W&B run %s", lg.id)


def remember_wandb_run(cfg: DictConfig, trainer: L.Trainer, loggers: list) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero and lg.version:
            (Path(cfg.paths.output_dir) / WANDB_ID_FILE).write_text(f"{lg.version}\n")


def interrupted_message(cfg: DictConfig, trainer: L.Trainer) -> str:
    """What an interrupted (Ctrl-C) run prints instead of its final audit: where it stopped and the
    command that resumes it in place."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    where = f"training interrupted in epoch {trainer.current_epoch} (step {trainer.global_step}); no final audit was run."
    if not last.exists():
        return f"{where} No checkpoint was written yet: start the run again."
    keep = [o for o in (HydraConfig.get().overrides.task if HydraConfig.initialized() else [])
            if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    cmd = " ".join(shlex.quote(o) for o in ["python", "train.py", *keep, f"hydra.run.dir={out}", f"ckpt_path={last}"])
    kept = "the same W&B run and the best-checkpoint bookkeeping" if (out / WANDB_ID_FILE).exists() else \
        "the best-checkpoint bookkeeping"
    return (f"{where} {last.name} holds the end of the last completed epoch (the interrupted epoch is "
            f"redone). Resume in this folder, with {kept}:\n  {cmd}")


def checkpoint_selection(trainer: L.Trainer) -> tuple[str | None, str]:
    """The checkpoint the final audit uses and how it was chosen. The default selects by the lowest
    val/loss: the InfoNCE over the whole val split is a smooth, low-variance criterion, where
    R@1 at N = 100 on a few hundred val studies moves by several points between epochs by chance
    (callbacks.model_checkpoint.monitor=audit/i2t/R@1/N=100 mode=max selects by the audit instead).
    Without a monitor (the DP stage: selection would be a release about private data) it is the
    last epoch's weights (the one checkpoint a top-1 ModelCheckpoint without a monitor keeps)."""
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if best and getattr(ckpt, "monitor", None):
        word = "lowest" if ckpt.mode == "min" else "highest"
        return best, f"{word} {ckpt.monitor} on the {getattr(trainer.datamodule, 'val_split', 'val')} split"
    last = (getattr(ckpt, "last_model_path", "") or best) if ckpt is not None else ""
    return (last or None), "last epoch"


def final_audit(cfg: DictConfig, trainer: L.Trainer, model, datamodule, callbacks: list, loggers: list) -> dict[str, Any]:
    """Audit the selected checkpoint on the held-out test split (``trainer.test``: the audit
    callbacks run in the test stage and log under test/...), write the one bundle into
    ``<run>/final_audit/`` (audit.bundle.final_bundle, as evaluate.py), print the headline and the
    table once, and attach the bundle to W&B. A DP model's privacy statement (``dp_state``) goes into
    both, next to the numbers it qualifies. Returns the test metrics."""
    from cxr_relink.audit.bundle import callback_sections, final_bundle

    ckpt_path, how = checkpoint_selection(trainer)
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    results = [cb.last_result for cb in callbacks if getattr(cb, "last_result", None)]
    if not results or not trainer.is_global_zero:
        return metrics
    sec = callback_sections(results)
    meta = sec["meta"]
    meta.pop("skipped", None)
    if sec["skipped"]:
        meta["skipped"] = sec["skipped"]
    meta["checkpoint_selection"] = how
    out = Path(cfg.paths.output_dir) / "final_audit"
    with heartbeat("writing the final audit's files (report, plot)", float(cfg.get("progress_every_s", 30) or 0)):
        final_bundle(out, meta, sec["settings"], relinkage=sec["relinkage"], probe=sec["probe"],
                     report_quality=sec["report_quality"], privacy=model.dp_state() if hasattr(model, "dp_state") else None,
                     logger=log)
    attach_to_wandb(loggers, out)
    return metrics


def attach_to_wandb(loggers: list, out: Path) -> None:
    """The final bundle as files of the W&B run (aggregate numbers only) and its plot under a key of
    its own (test/recall_vs_n; the per-epoch validation plot is audit/recall_vs_n). The files are
    copied into the W&B run's folder, not linked: wandb.save's absolute symlinks broke when the run
    folder was copied or moved (they are small)."""
    import shutil

    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        if (out / "recall_vs_n.png").exists():
            lg.log_image(key="test/recall_vs_n", images=[str(out / "recall_vs_n.png")])
        files = Path(lg.experiment.dir)
        for name in ("audit.json", "report.md"):
            (files / out.name).mkdir(parents=True, exist_ok=True)
            copy = shutil.copy2(out / name, files / out.name / name)
            lg.experiment.save(str(copy), base_path=str(files), policy="now")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    quiet_known_warnings()
    if str(OmegaConf.select(cfg, "model._target_", default="")).startswith("models.external."):
        raise cli.UsageError(
            "model=hf_clip|open_clip is an existing model, not one train.py trains: audit it with "
            "`python evaluate.py model=<it> model.path=...`, or train its own heads with DP with "
            "`python train.py experiment=dp_alignment model.external.path=...`")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise cli.UsageError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file (a run keeps its own in "
                         "<run>/checkpoints/last.ckpt)")
    L.seed_everything(cfg.seed, workers=True)
    every = float(cfg.get("progress_every_s", 30) or 0)  # a progress line every ~30 s (callbacks/progress.py)
    datamodule = instantiate(cfg.data)
    if cfg.get("ckpt_path"):
        # Resuming: token ids must keep their meaning, so reuse the checkpoint's tokenizer rather
        # than retraining one on today's data (same size, different words, would load silently).
        from cxr_relink.datamodules.text import tokenizer_from_state
        from cxr_relink.models.checkpoint import KEY, load_checkpoint_dict

        saved = load_checkpoint_dict(cfg.ckpt_path)
        log_resume_changes(saved, cfg, cfg.ckpt_path)  # each key that differs from the checkpoint's run
        extras = saved.get(KEY)
        if extras is not None:  # (a DP run on an existing model's heads brings that model's tokenizer)
            datamodule.tokenizer = tokenizer_from_state(extras["tokenizer"])
    with heartbeat("preparing the data and the model (a first run generates or reads the cohort)", every):
        datamodule.setup("fit")  # builds the tokenizer the text tower is sized by (unless resuming)
        model = instantiate(cfg.model, tokenizer=datamodule.tokenizer)
    if (llm := describe_llm_tower(model)) is not None:
        log.info("%s", llm)
    # Each epoch's randomness from (seed, epoch): a run resumed at an epoch boundary replays it.
    # ... one log line per epoch where no progress bar is seen (a log file, nohup, Slurm), a progress
    # line (steps done, elapsed, ETA) every `progress_every_s` in log files, and the resolved config in
    # every checkpoint (a resume lists what it changes).
    watch = [cfg.get("optimized_metric"), "probe/macro_auroc", "dp/epsilon"]
    callbacks = [EpochSeed(cfg.seed), EpochLine(watch), Progress(every, enabled=every > 0), SaveRunConfig(cfg),
                 *instantiate_group(cfg.get("callbacks"))]
    continue_wandb_run(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "callbacks": callbacks}
    exit_code = 1
    try:
        log_run_config(cfg, model, loggers)
        remember_wandb_run(cfg, trainer, loggers)
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        except SystemExit:  # Lightning's answer to Ctrl-C, after a graceful shutdown
            if trainer.interrupted:
                log.error("%s", interrupted_message(cfg, trainer))
            raise
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("final_audit") and not trainer.fast_dev_run:
            metrics.update(final_audit(cfg, trainer, model, datamodule, callbacks, loggers))
        exit_code = 0
    finally:
        finish_wandb(exit_code)
    return metrics, objects


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    with cli.usage_errors():
        metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    cli.run(main, "train.yaml")  # usage mistakes: one clear message naming the valid choices, exit status 2
