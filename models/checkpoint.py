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
# Only classes from this project's own packages are ever rebuilt from a checkpoint.
ALLOWED_PREFIXES = ("models.",)


def plain(x: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (weights_only checkpoints cannot hold DictConfig)."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def save_extras(module, checkpoint: dict[str, Any]) -> None:
    cls = type(module)
    checkpoint[KEY] = {
        "format_version": FORMAT_VERSION,
        "module_class": f"{cls.__module__}.{cls.__qualname__}",
        "tokenizer": tokenizer_to_state(module.tokenizer),
    }


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
    qualname = extras["module_class"]
    if not qualname.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"checkpoint {path}: refusing to build class {qualname!r} outside {ALLOWED_PREFIXES}")
    mod_name, cls_name = qualname.rsplit(".", 1)
    cls = getattr(importlib.import_module(mod_name), cls_name)
    tokenizer = tokenizer_from_state(extras["tokenizer"])
    module = cls(**ckpt["hyper_parameters"], tokenizer=tokenizer)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(map_location).eval()
