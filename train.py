"""Train a model: `python train.py [model=llm_encoder] [experiment=...] [key=value ...]`.

The work is `train(cfg)`, which tests call with a composed config; `main()` is the Hydra entry point
and returns the metric a sweeper optimises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("CXR_RELINK_ROOT", str(Path(__file__).resolve().parent))
# W&B: offline unless the user says otherwise; never ask questions on a terminal.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

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


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # builds the tokenizer the text tower is sized by
    model = instantiate(cfg.model, tokenizer=datamodule.tokenizer)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "callbacks": callbacks}
    try:
        log_run_config(cfg, model, loggers)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("final_audit") and not trainer.fast_dev_run:
            # The final audit runs on the held-out test split with the best checkpoint.
            datamodule.val_split = "test"
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
            trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update({f"test/{k}": float(v) for k, v in trainer.callback_metrics.items()})
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
