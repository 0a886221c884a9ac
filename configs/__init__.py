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
    """The defaults of the ``name`` audit updated with ``given``; a key the defaults do not define is a
    TypeError, as an unknown keyword argument would be. The audit library's own audits ("relinkage",
    "probe", "report_quality") keep their defaults in audit/settings.py; the others (e.g. "adaptive")
    in configs/audit/settings/<name>.yaml."""
    from cxr_relink.audit import settings as library

    if name in library.SETTINGS:
        return library.resolve(name, given)
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "audit" / "settings" / f"{name}.yaml"))
    unknown = sorted(set(given or {}) - set(settings))
    if unknown:
        raise TypeError(f"unknown {name} audit settings {unknown}; known: {sorted(settings)}")
    return {**settings, **(given or {})}


def _register_audit_settings() -> None:
    """The audit library's settings (audit/settings.py) as the Hydra configs audit/settings/<name>, which
    configs/audit/*.yaml and configs/callbacks/audits.yaml compose: one source for the library, the
    callbacks and the command lines. Registered when this package is imported, as every entry point does
    before Hydra composes."""
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError:  # `pip install .` without the [train] extra: the audit library alone, no Hydra
        return
    from cxr_relink.audit.settings import SETTINGS, defaults

    for name in SETTINGS:
        ConfigStore.instance().store(group="audit/settings", name=name, node=defaults(name))


_register_audit_settings()


def _register_dp_settings() -> None:
    """The DP stage's settings (models/dp/plan.py, the one source of their defaults) as the Hydra configs
    dp/settings/dp and dp/settings/loss, which configs/experiment/dp_alignment.yaml composes under model.dp and
    model.loss."""
    try:
        from hydra.core.config_store import ConfigStore
        from cxr_relink.models.dp.plan import SETTINGS
    except ImportError:  # the audit library alone (no Hydra, no training extras)
        return
    for name, node in SETTINGS.items():
        ConfigStore.instance().store(group="dp/settings", name=name, node=dict(node))


_register_dp_settings()
