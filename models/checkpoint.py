"""Checkpoints that rebuild their model alone: hyper-parameters + tokenizer + class, loaded safely.

Every LightningModule of this project calls `save_extras` in `on_save_checkpoint`; `load_module`
reads a checkpoint with `torch.load(weights_only=True)` (no arbitrary unpickling) and rebuilds the
module from it, so `evaluate.py ckpt_path=...` needs nothing else.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.text import tokenizer_from_state, tokenizer_to_state

FORMAT_VERSION = 1
KEY = "cxr_relink"
# Only classes from this project's own packages are ever rebuilt from a checkpoint ...
ALLOWED_PREFIXES = ("models.",)
# ... and the config it carries may only name these `_target_`s (towers, optimisers, schedules):
# hyper-parameters are data from the file, so a `_target_` there must never reach an arbitrary callable.
ALLOWED_TARGETS = ("models.", "torch.optim.", "torch.nn.")


def plain(x: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (weights_only checkpoints cannot hold DictConfig)."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


# How the datamodule turned images and reports into tensors; evaluate.py applies the same.
PREPROCESSING_KEYS = ("image_size", "image_channels", "mean", "std", "text_field", "max_length")


def save_extras(module, checkpoint: dict[str, Any]) -> None:
    cls = type(module)
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    data = {k: getattr(dm, k) for k in PREPROCESSING_KEYS if hasattr(dm, k)} if dm is not None else None
    checkpoint[KEY] = {
        "format_version": FORMAT_VERSION,
        "module_class": f"{cls.__module__}.{cls.__qualname__}",
        "tokenizer": tokenizer_to_state(module.tokenizer),
        "data": data or getattr(module, "data_preprocessing", None),
    }


def check_targets(config: Any, where: str) -> None:
    """Raise if any `_target_` nested in `config` lies outside ALLOWED_TARGETS."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(ALLOWED_TARGETS)):
            raise ValueError(f"{where}: refusing to build `_target_` {target!r} outside {ALLOWED_TARGETS}")
        for k, v in config.items():
            check_targets(v, f"{where}.{k}")
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            check_targets(v, f"{where}[{i}]")


def import_module_class(qualname: str, hparams: dict[str, Any], where: str):
    """The LightningModule class named in a checkpoint, after checking it and its config are ours."""
    if not qualname.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"{where}: refusing to build class {qualname!r} outside {ALLOWED_PREFIXES}")
    check_targets(hparams, f"{where}: hyper_parameters")
    mod_name, cls_name = qualname.rsplit(".", 1)
    return getattr(importlib.import_module(mod_name), cls_name)


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused: the file holds more than tensors and containers
        raise ValueError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {e}") from None


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the LightningModule stored in `path` (eval mode), with its tokenizer."""
    ckpt = load_checkpoint_dict(path)
    extras = ckpt.get(KEY)
    if extras is None:
        raise ValueError(f"checkpoint {path} was not written by cxr-relink (no '{KEY}' entry)")
    if extras.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: format version {extras.get('format_version')}, expected {FORMAT_VERSION}")
    cls = import_module_class(extras["module_class"], ckpt.get("hyper_parameters", {}), f"checkpoint {path}")
    tokenizer = tokenizer_from_state(extras["tokenizer"])
    module = cls(**ckpt["hyper_parameters"], tokenizer=tokenizer)
    module.load_state_dict(ckpt["state_dict"])
    module.data_preprocessing = extras.get("data")  # None for checkpoints saved outside a Trainer
    module.saved_dp_state = ckpt.get("dp_state")  # a DP stage's privacy statement (None otherwise)
    module.saved_epoch = ckpt.get("epoch")  # Lightning's 0-based epoch, as in epoch_NNN.ckpt
    return module.to(map_location).eval()
