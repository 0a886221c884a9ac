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
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import configs  # noqa: E402, F401  (sets CXR_RELINK_ROOT)

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


def log_run_config(cfg: DictConfig, model, loggers: list) -> None:
    """Log the resolved config under `cfg/` (W&B sweeps lock their swept keys in the run config,
    so our own copy lives under a prefix that cannot collide) and the parameter counts."""
    counts = count_parameters(model)
    log.info("parameters: %s", counts)
    for lg in loggers:
        lg.log_hyperparams({"cfg": OmegaConf.to_container(cfg, resolve=True), **counts})


def finish_wandb() -> None:
    """Close the W&B run (also after an error) so consecutive sweep-agent runs never merge."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def write_final_audit(callbacks: list, out_dir: str | Path, model=None) -> str | None:
    """Merge the audit callbacks' last results (test split) into one audit.json + plot + report.md
    in the run directory (audit.result.write_bundle, as evaluate.py), and return the Markdown table
    (aggregate numbers only, no PHI). A DP model's privacy statement (``dp_state``) goes into both, next
    to the numbers it qualifies."""
    from audit import result as R

    results = [cb.last_result for cb in callbacks if getattr(cb, "last_result", None)]
    if not results:
        return None
    rel = next((r for r in results if r.get("relinkage")), None)
    probe = next((r for r in results if r.get("probe")), None)
    base = rel or probe
    merged = R.build_result(
        relinkage=rel["relinkage"] if rel else None, probe=probe["probe"] if probe else None,
        meta=base["meta"], settings={"relinkage": rel["settings"] if rel else None, "probe": probe["settings"] if probe else None},
        privacy=model.dp_state() if hasattr(model, "dp_state") else None,
    )
    return R.write_bundle(merged, out_dir)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if cfg.get("ckpt_path"):
        # Resuming: token ids must keep their meaning, so reuse the checkpoint's tokenizer rather
        # than retraining one on today's data (same size, different words, would load silently).
        from datamodules.text import tokenizer_from_state
        from models.checkpoint import KEY, load_checkpoint_dict

        datamodule.tokenizer = tokenizer_from_state(load_checkpoint_dict(cfg.ckpt_path)[KEY]["tokenizer"])
    datamodule.setup("fit")  # builds the tokenizer the text tower is sized by (unless resuming)
    model = instantiate(cfg.model, tokenizer=datamodule.tokenizer)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "callbacks": callbacks}
    try:
        log_run_config(cfg, model, loggers)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("final_audit") and not trainer.fast_dev_run:
            # The final audit runs on the held-out test split with the best checkpoint.
            datamodule.val_split = "test"
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
            trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
            table = write_final_audit(callbacks, Path(cfg.paths.output_dir) / "final_audit", model)
            if table:
                log.info("final audit (test split, best checkpoint):\n%s", table)
                print(table)
    finally:
        finish_wandb()
    return metrics, objects


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
