"""evaluate.py's glue for the adaptive attacker (audit/adaptive.py): the released model's frozen trunk
features and released embeddings of the audited split and of the attacker's auxiliary studies, then
the attacks, each audited with the run's re-linkage settings.

What the attacker sees of each kind of model:
* a cxr-relink dual tower (stage 2): ``image_features`` / ``text_features`` (the towers' outputs) and
  the released ``image_head`` / ``text_head``;
* a DP checkpoint (stage 3): the frozen backbone's features and the DP-trained heads
  (``encode_image_features`` / ``encode_report_features``);
* an existing model (model=hf_clip|open_clip): the library's own features with the projection removed
  (models/external_heads.py) and the model's own projections. A model without a separate projection
  per tower (SigLIP) has no trunk to attack apart from its released space: its released embeddings
  stand in for the trunk features (recorded in the section's ``trunk``).

Features are computed once per split and cached like the DP stage's (models/dp/features.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from cxr_relink.audit.adaptive import AUX_KINDS, PairedFeatures, adaptive_audit
from cxr_relink.audit.embeddings import report_hash
from cxr_relink.audit.relinkage import Relinkage

log = logging.getLogger(__name__)


class _Trunk:
    """A module's trunk (``image_features``, ``text_features``) and its released heads on trunk features."""

    def __init__(self, trunk: Any, release_image: Callable, release_text: Callable, key: str, what: str) -> None:
        self.trunk, self.release_image, self.release_text, self.key, self.what = trunk, release_image, release_text, key, what

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk.image_features(image)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.trunk.text_features(input_ids, attention_mask)


class _Released:
    """A model without a separate projection: its released embeddings are its trunk features."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.module.encode_images(image)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.module.encode_reports(input_ids, attention_mask)


def model_trunk(cfg: DictConfig, module: Any) -> _Trunk:
    """The attacker's view of the audited module (see the module docstring)."""
    from cxr_relink.models.hashing import file_sha256

    if hasattr(module, "encode_image_features"):  # DP checkpoint: frozen backbone + DP heads
        return _Trunk(module, module.encode_image_features, module.encode_report_features,
                      file_sha256(cfg.ckpt_path), "the frozen backbone's features; the DP-trained heads")
    if hasattr(module, "image_head") and hasattr(module, "image_features"):  # stage-2 dual tower
        return _Trunk(module, lambda f: F.normalize(module.image_head(f), dim=-1),
                      lambda f: F.normalize(module.text_head(f), dim=-1), file_sha256(cfg.ckpt_path),
                      "the towers' outputs; the released projection heads")
    from cxr_relink.models.external_heads import SPEC_KEYS, ExternalSplit

    spec = {k: OmegaConf.select(cfg, f"model.{k}", default=None) for k in SPEC_KEYS}
    spec["dtype"] = spec["dtype"] or "float32"
    try:
        ext = ExternalSplit.load(spec)
    except ValueError as e:  # no projection per tower (SigLIP, ModifiedResNet): nothing to strip off
        log.warning("adaptive attacker: %s; its released embeddings stand in for the trunk features", e)
        from cxr_relink.models.external_heads import model_fingerprint, resolve_spec

        ident = lambda f: F.normalize(f, dim=-1)  # noqa: E731
        return _Trunk(_Released(module), ident, ident, "released-" + model_fingerprint(resolve_spec(spec)),
                      f"the released embeddings (no separate projection: {e})")
    trunk = ext.trunk.to(module.device)
    ih, th = ext.image_head.to(module.device).eval(), ext.text_head.to(module.device).eval()
    return _Trunk(trunk, lambda f: F.normalize(ih(f), dim=-1), lambda f: F.normalize(th(f), dim=-1), ext.fingerprint,
                  "the library's features before its projections (models/external_heads.py); its own projections")


@torch.no_grad()
def paired_features(trunk: _Trunk, dm, split: str, cache_root: Path, device: torch.device, name: str) -> PairedFeatures:
    """One split of ``dm`` through the trunk (cached) and the released heads."""
    from cxr_relink.datamodules.datamodule import study_text
    from cxr_relink.models.dp.features import cached_split_features

    if not dm.studies(split):
        raise ValueError(f"adaptive attacker: split {split!r} of the {name} cohort is empty")
    f = cached_split_features(trunk, dm, split, cache_root, trunk.key, device)

    def release(fn, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(c.to(device)).float().cpu() for c in torch.split(x, 4096)])

    labels = f["labels"].numpy()
    return PairedFeatures(
        f["image"], f["text"], release(trunk.release_image, f["image"]), release(trunk.release_text, f["text"]),
        f["item_study"], f["patient_key"].numpy(), labels if np.isfinite(labels).any() else None,
        [report_hash(study_text(st, dm.text_field)) for st in dm.studies(split)], name=name)


def adaptive_section(cfg: DictConfig, module: Any, dm, make_datamodule: Callable) -> dict[str, Any]:
    """The ``adaptive`` section of audit.json for the module evaluate.py audits on ``dm`` (split
    ``cfg.split``). ``make_datamodule(cfg, module)`` is evaluate.py's prepared_datamodule (the public
    cohort is prepared the way the audited one is)."""
    from cxr_relink.configs import audit_settings

    node = OmegaConf.to_container(cfg.audit.adaptive, resolve=True)
    public_cfg = node.pop("public_cohort", None)
    s = audit_settings("adaptive", node)
    unknown = [a for a in s["aux"] if a not in AUX_KINDS]
    if unknown or not s["aux"]:
        raise ValueError(f"audit.adaptive.aux must be a non-empty subset of {AUX_KINDS}, got {s['aux']}")
    rel = Relinkage.from_config(cfg.audit.relinkage) if cfg.audit.get("relinkage") else Relinkage()
    trunk = model_trunk(cfg, module)
    device = next(module.parameters()).device
    root = Path(OmegaConf.select(cfg, "paths.cache_dir", default=None) or ".cache")
    cohort = OmegaConf.select(cfg, "data.reader.cohort")
    target = paired_features(trunk, dm, cfg.split, root, device, f"audited split {cfg.split!r}")
    aux, info = {}, {}
    if "leaked" in s["aux"]:
        aux["leaked"] = paired_features(trunk, dm, s["leaked_split"], root, device, "leaked")
        info["leaked"] = {"cohort": cohort, "split": s["leaked_split"]}
    if "public" in s["aux"]:
        if not public_cfg:
            raise ValueError("audit.adaptive.aux has 'public' but audit.adaptive.public_cohort is not set (a data config)")
        pcfg = cfg.copy()
        with open_dict(pcfg):
            pcfg.data = public_cfg
        pdm = make_datamodule(pcfg, module)
        aux["public"] = paired_features(trunk, pdm, s["public_split"], root, device, "public")
        info["public"] = {"cohort": (public_cfg.get("reader") or {}).get("cohort"), "split": s["public_split"]}
    log.info("adaptive attacker: %s on %d audited studies, aux %s", s["attacks"], target.n_studies,
             {k: v.n_studies for k, v in aux.items()})
    sec = adaptive_audit(target, aux, rel.audit, n_aux=s["n_aux"], attacks=s["attacks"], seed=s["seed"],
                         head=s["head"], ridge=s["ridge"], n_draws=s["n_draws"], aux_info=info)
    sec["trunk"] = trunk.what
    return sec
