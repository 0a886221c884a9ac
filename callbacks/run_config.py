"""The run's resolved config inside every checkpoint, so that a resume can say what it changed.

A resume (``ckpt_path=<run>/checkpoints/last.ckpt``) composes today's config: a changed
``trainer.max_epochs``, learning rate or data setting applies silently, and resuming in place
overwrites the first leg's ``.hydra/config.yaml``. ``SaveRunConfig`` writes the resolved config
(YAML text, under ``checkpoint["cxr_relink_run_config"]``) into each checkpoint; ``resume_changes``
compares it with the current config and train.py logs one line per changed key.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.resume")

CKPT_KEY = "cxr_relink_run_config"
# Keys that differ between legs by construction, or change nothing the run computes.
IGNORED = ("ckpt_path", "progress_every_s")


def config_text(cfg: DictConfig) -> str:
    try:
        return OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    except Exception:  # noqa: BLE001  (an interpolation that cannot be resolved now: keep it as written)
        return OmegaConf.to_yaml(cfg)


class SaveRunConfig(Callback):
    def __init__(self, cfg: DictConfig) -> None:
        self.text = config_text(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = self.text


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_changes(saved: dict[str, Any], current: dict[str, Any], ignored=IGNORED) -> list[tuple[str, Any, Any]]:
    """[(dotted key, saved value, current value)] for every key whose value differs (a key only on
    one side: the missing value is the string "(absent)"), sorted by key."""
    a, b = _flatten(saved), _flatten(current)
    absent = "(absent)"
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in ignored or key.split(".")[0] in ignored:
            continue
        va, vb = a.get(key, absent), b.get(key, absent)
        if va != vb:
            changes.append((key, va, vb))
    return changes


def resume_changes(checkpoint: dict[str, Any], cfg: DictConfig) -> list[tuple[str, Any, Any]] | None:
    """What the current config changes against the one saved in ``checkpoint``; None when the
    checkpoint carries no run config (written before SaveRunConfig, or by another program)."""
    text = checkpoint.get(CKPT_KEY)
    if not isinstance(text, str):
        return None
    saved = OmegaConf.to_container(OmegaConf.create(text))
    current = OmegaConf.to_container(OmegaConf.create(config_text(cfg)))
    return config_changes(saved, current)


def log_resume_changes(checkpoint: dict[str, Any], cfg: DictConfig, ckpt_path: str) -> list[tuple[str, Any, Any]] | None:
    changes = resume_changes(checkpoint, cfg)
    if changes is None:
        log.warning("resuming from %s: the checkpoint carries no run config, so changes to the config since "
                    "it was written cannot be listed", ckpt_path)
    elif not changes:
        log.info("resuming from %s with the config it was written with (no key changed)", ckpt_path)
    else:
        log.warning("resuming from %s with %d config change(s) against the checkpoint's run:\n%s", ckpt_path,
                    len(changes), "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in changes))
    return changes
