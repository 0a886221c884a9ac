"""Checkpoints that rebuild their model alone: hyper-parameters + tokenizer + class, loaded safely.

Every LightningModule of this project calls `save_extras` in `on_save_checkpoint`; `load_module`
reads a checkpoint with `torch.load(weights_only=True)` (no arbitrary unpickling) and rebuilds the
module from it, so `evaluate.py ckpt_path=...` needs nothing else.

Frozen weights that a submodule rebuilds from a local base folder (a pretrained LLM text tower under
LoRA: `external_state()` in models/llm_encoder.py) are not stored: the checkpoint keeps what was trained
(adapters, pooler, heads, image tower, logit scale) plus the base folder's path and sha256 fingerprint.
`load_module` rebuilds the base from that path (or a new one: `overrides={"text_tower.pretrained": dir}`)
and refuses a base whose fingerprint differs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from cxr_relink.datamodules.text import tokenizer_from_state, tokenizer_to_state
from cxr_relink.models.contract import EmbeddingModel, as_embedding_model
from cxr_relink.models.load_guard import compare_state_dict, enforce

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


def save_extras(module, checkpoint: dict[str, Any], strip_external: bool = False) -> None:
    """Record what rebuilds `module` in a Lightning checkpoint. strip_external: leave out the frozen
    weights its submodules rebuild from a base folder (`strip_external_weights`); a module that opts in
    must call `restore_external_weights` in its `on_load_checkpoint`, or resuming cannot load strictly."""
    cls = type(module)
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    data = {k: getattr(dm, k) for k in PREPROCESSING_KEYS if hasattr(dm, k)} if dm is not None else None
    checkpoint[KEY] = {
        "format_version": FORMAT_VERSION,
        "module_class": f"{cls.__module__}.{cls.__qualname__}",
        "tokenizer": tokenizer_to_state(module.tokenizer),
        "data": data or getattr(module, "data_preprocessing", None),
        "external_weights": strip_external_weights(module, checkpoint.get("state_dict")) if strip_external else {},
    }


def strip_external_weights(module, state_dict: dict[str, Any] | None) -> dict[str, Any]:
    """Remove from `state_dict` (in place) the frozen weights that submodules rebuild from their base
    folder; return {submodule name: {"pretrained", "fingerprint", "keys"}} for `load_module` to check."""
    out: dict[str, Any] = {}
    if state_dict is None:
        return out
    for name, sub in module.named_modules():
        fn = getattr(sub, "external_state", None)
        info = fn() if callable(fn) else None
        if not info:
            continue
        prefix = f"{name}." if name else ""
        keys = [prefix + k for k in info["keys"] if prefix + k in state_dict]
        for k in keys:
            del state_dict[k]
        out[name] = {"pretrained": info["pretrained"], "fingerprint": info["fingerprint"], "keys": keys}
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_overrides(hparams: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """Set dotted keys ({"text_tower.pretrained": "/new/dir"}, or the nested form {"text_tower": {...}})
    in the checkpoint's hyper-parameters; only existing keys, never a `_target_`."""
    for key, value in _flatten(plain(overrides or {})).items():
        parts = key.split(".")
        node = hparams
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise KeyError(f"{where}: override {key!r} names no hyper-parameter of the checkpoint")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node or parts[-1] == "_target_":
            raise KeyError(f"{where}: override {key!r} names no overridable hyper-parameter of the checkpoint")
        node[parts[-1]] = value
    return hparams


def restore_external_weights(module, checkpoint: dict[str, Any], where: str = "checkpoint") -> None:
    """Put back into `checkpoint["state_dict"]` the base weights `strip_external_weights` left out, taken
    from `module` as rebuilt from its base folder, after checking each folder's fingerprint. Called by
    `load_module` and by the modules' `on_load_checkpoint` (Lightning resumes then load strictly)."""
    external = (checkpoint.get(KEY) or {}).get("external_weights") or {}
    if not external:
        return
    own = module.state_dict()
    for name, info in external.items():
        sub = module.get_submodule(name) if name else module
        got = sub.base_fingerprint() if hasattr(sub, "base_fingerprint") else None
        want = info["fingerprint"]
        if got is None or got["digest"] != want["digest"]:
            have = (got or {}).get("files", {})
            differ = sorted(k for k in set(want["files"]) | set(have) if want["files"].get(k) != have.get(k))
            raise ValueError(
                f"{where}: the base of `{name}` at {getattr(sub, 'pretrained', None)!r} is not the one this "
                f"checkpoint was trained on (saved from {info['pretrained']!r}; fingerprint {want['digest'][:12]} "
                f"expected, got {(got or {}).get('digest', 'none')[:12]}; differing files: {differ}). Its "
                "adapters are only valid on that exact base.")
        for k in info["keys"]:
            checkpoint["state_dict"].setdefault(k, own[k])


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


def load_module(path: str | Path, map_location: str | torch.device = "cpu", overrides: dict[str, Any] | None = None,
                allow_partial_load: bool = False):
    """Rebuild the LightningModule stored in `path` (eval mode), with its tokenizer, and set what the
    checkpoint records about it (models/contract.py, LoadedState): `data_preprocessing`, `saved_dp_state`,
    `saved_epoch`, `load_notes`. An embedding model to audit: `load_embedding_model`.

    overrides: hyper-parameters to change before rebuilding, e.g. {"text_tower.pretrained": "/new/dir"}
    when the base LLM folder has moved (its fingerprint must still match). Weights that do not fit the
    rebuilt module (missing, unexpected, other shapes) are refused (models/load_guard.py);
    allow_partial_load loads the rest and lists the problems in `module.load_notes`."""
    ckpt = load_checkpoint_dict(path)
    extras = ckpt.get(KEY)
    if extras is None:
        raise ValueError(f"checkpoint {path} was not written by cxr-relink (no '{KEY}' entry)")
    if extras.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: format version {extras.get('format_version')}, expected {FORMAT_VERSION}")
    hparams = apply_overrides(ckpt.get("hyper_parameters", {}), overrides, f"checkpoint {path}")
    cls = import_module_class(extras["module_class"], hparams, f"checkpoint {path}")
    tokenizer = tokenizer_from_state(extras["tokenizer"])
    external = extras.get("external_weights") or {}
    try:
        module = cls(**hparams, tokenizer=tokenizer)
    except Exception as e:  # hydra wraps the tower's FileNotFoundError in an InstantiationException
        cause = e
        while cause is not None and not isinstance(cause, FileNotFoundError):
            cause = cause.__cause__
        if not external or cause is None:
            raise
        e = cause
        bases = {n: i["pretrained"] for n, i in external.items()}
        raise FileNotFoundError(
            f"checkpoint {path} stores only the trained weights; its base folder(s) {bases} are needed: {e}. If "
            "a base has moved, give its new path (evaluate.py: +model.<tower>.pretrained=<dir>; Python: "
            "load_module(path, overrides={'<tower>.pretrained': dir}))") from None
    restore_external_weights(module, ckpt, f"checkpoint {path}")
    own = module.state_dict()
    problems = compare_state_dict(own, ckpt["state_dict"])
    module.load_notes = enforce(problems, f"checkpoint {path}", allow_partial_load)
    bad = {k for k, _, _ in problems.mismatched}
    module.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if k not in bad}, strict=not problems)
    module.data_preprocessing = extras.get("data")  # None for checkpoints saved outside a Trainer
    module.saved_dp_state = ckpt.get("dp_state")  # a DP stage's privacy statement (None otherwise)
    module.saved_epoch = ckpt.get("epoch")  # Lightning's 0-based epoch, as in epoch_NNN.ckpt
    return module.to(map_location).eval()


def load_embedding_model(path: str | Path, map_location: str | torch.device = "cpu",
                         overrides: dict[str, Any] | None = None, allow_partial_load: bool = False) -> EmbeddingModel:
    """`load_module` of a checkpoint whose module is an embedding model (models/contract.py: a dual
    tower, a DP stage); a TypeError for any other (a stage-1 text adaptation checkpoint)."""
    module = load_module(path, map_location, overrides, allow_partial_load)
    return as_embedding_model(module, f"checkpoint {path}")
