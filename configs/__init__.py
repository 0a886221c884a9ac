"""The Hydra config tree, importable: where the repository is, and the one way code that is not a
Hydra entry point composes or reads a config.

Importing it sets CXR_RELINK_ROOT (``paths.root_dir`` in paths/default.yaml: logs and caches live
under it) to this repository, unless the environment already sets it. Every entry point imports it
(train.py, evaluate.py, tests/conftest.py, bench/ and experiments/, which run from the repository
root as modules: ``python -m bench.bench_audit``), so none of them locates the root itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
os.environ.setdefault("CXR_RELINK_ROOT", str(ROOT))


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """Compose ``configs/<config_name>`` with command-line style overrides, as the CLI would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def audit_settings(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of the ``name`` audit ("relinkage" | "probe") from configs/audit/settings/,
    updated with ``given``; a key the settings file does not define is a TypeError, as an unknown
    keyword argument would be."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "audit" / "settings" / f"{name}.yaml"))
    unknown = sorted(set(given or {}) - set(settings))
    if unknown:
        raise TypeError(f"unknown {name} audit settings {unknown}; known: {sorted(settings)}")
    return {**settings, **(given or {})}
