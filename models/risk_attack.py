"""evaluate.py's glue for the three numbers (audit/risk.py; docs/audit.md "Capability, release-attributable,
memorisation"): the features of the audited model, of the release-free attackers and of the reference model,
for the audited split, the attacker's auxiliary studies and the model's training patients; then
``audit.risk.risk_audit``.

Who is who, on the `data=` cohort:
* audited (capability; non-members of the memorisation test): split ``cfg.split`` (held-out patients);
* the model's training split (``member_split``, default train) is divided by patient, seeded: a fraction
  ``aux_fraction`` of its patients are the attacker's auxiliary pairs ("leaked" training pairs, so
  distribution-matched), the rest are the members scored by the memorisation test (an aux pair is never
  scored as a member: the attack was fitted on it);
* release-free sources (``no_release_sources``): ``raw`` = each image's pixels average-pooled to
  ``raw.image_px``² (grey) and each report's token ids hashed into ``raw.text_buckets`` bag-of-words counts
  (log1p): what an attacker holds with no model at all; the no-release attacks (pool centring, ridge, fresh
  linear heads trained from scratch with the head attack's budget) run on them. ``public`` = the trunk and
  released heads of ``public_ckpt``, a checkpoint of this repository trained on public data only (e.g. the
  reproduction's public-cohort stage-2 model), when one is given: its features feed the same attacks plus
  its own cosine and Procrustes; it is also the reference model of the pair-level membership test (it never
  saw the audited cohort's pairs).
Why "from scratch" is linear heads on raw features and not the model's own towers re-initialised: training
a CNN + transformer dual tower on k = 100 pairs per draw, 5 draws, is minutes per draw on CPU and, on so few
pairs, no stronger than a linear map of the raw inputs; the linear version is stated as what it is.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from cxr_relink.audit.adaptive import PairedFeatures
from cxr_relink.audit.relinkage import Relinkage
from cxr_relink.audit.risk import NO_RELEASE, risk_audit

log = logging.getLogger(__name__)


class RawTrunk:
    """Release-free features: pooled grey pixels and hashed report bag-of-words, one dimension for both (so the
    'released' space, unused by the raw attacks, is well formed)."""

    def __init__(self, image_px: int, text_buckets: int, key: str) -> None:
        self.image_px, self.text_buckets = int(image_px), int(text_buckets)
        self.key = hashlib.sha256(f"raw-v1|{image_px}|{text_buckets}|{key}".encode()).hexdigest()
        self.what = f"raw: pixels pooled to {image_px}x{image_px} (grey), reports as {text_buckets} hashed token counts"
        self.dim = max(self.image_px**2, self.text_buckets)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(image.float().mean(1, keepdim=True), self.image_px).flatten(1)
        return F.pad(x, (0, self.dim - x.shape[1]))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b = (input_ids.long() % self.text_buckets)
        out = torch.zeros(input_ids.shape[0], self.dim, device=input_ids.device)
        out.scatter_add_(1, b, attention_mask.float())
        return torch.log1p(out)

    def release_image(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=-1)

    release_text = release_image


def split_by_patient(feats: PairedFeatures, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Study indices of a seeded ``fraction`` of the patients (the aux pairs) and of the rest (the members)."""
    pats = np.unique(feats.study_patient)
    if not 0 < fraction < 1 or pats.size < 4:
        raise ValueError(f"risk: aux_fraction must be in (0, 1) and the member split needs >= 4 patients "
                         f"(got {fraction}, {pats.size})")
    chosen = np.random.default_rng([int(seed), 31]).permutation(pats)[: max(1, round(fraction * pats.size))]
    is_aux = np.isin(feats.study_patient, chosen)
    return np.flatnonzero(is_aux), np.flatnonzero(~is_aux)


def risk_section(cfg: DictConfig, module: Any, dm, make_datamodule: Callable) -> dict[str, Any]:
    """The ``risk`` section of audit.json for the module evaluate.py audits on ``dm`` (split ``cfg.split``)."""
    from cxr_relink.models.adaptive_attack import model_trunk, paired_features
    from cxr_relink.configs import audit_settings

    s = audit_settings("risk", OmegaConf.to_container(cfg.audit.risk, resolve=True))
    unknown = [x for x in s["no_release_sources"] if x not in ("raw", "public")]
    if unknown:
        raise ValueError(f"audit.risk.no_release_sources: unknown {unknown}; expected a subset of [raw, public]")
    rel_s = {k: v for k, v in OmegaConf.to_container(cfg.audit.relinkage, resolve=True).items()
             if k in ("n_boot", "ties", "seed", "allow_degenerate", "chunk_size", "device", "fused")}
    # The three numbers read image -> report R@k at one N: the other directions and variants would only cost time.
    rel = Relinkage(**{**rel_s, "ks": [int(s["k"])], "ns": [s["n"], "full"], "directions": ["i2t"],
                       "hardneg": False, "dedup": False})
    device = next(module.parameters()).device
    root = Path(OmegaConf.select(cfg, "paths.cache_dir", default=None) or ".cache")
    trunk = model_trunk(cfg, module)

    def feats(tr, d, split: str, name: str) -> PairedFeatures:
        return paired_features(tr, d, split, root, device, name)

    target = feats(trunk, dm, cfg.split, f"audited split {cfg.split!r}")
    train = feats(trunk, dm, s["member_split"], f"training split {s['member_split']!r}")
    aux_idx, mem_idx = split_by_patient(train, float(s["aux_fraction"]), int(s["seed"]))
    aux, members = train.select(aux_idx), train.select(mem_idx)
    sources: dict[str, tuple] = {}
    refs: dict[str, list] = {"members": [], "nonmembers": []}
    info: dict[str, Any] = {}
    if "raw" in s["no_release_sources"]:
        raw = RawTrunk(s["raw"]["image_px"], s["raw"]["text_buckets"], trunk.key)
        rt, rtrain = feats(raw, dm, cfg.split, "raw audited"), feats(raw, dm, s["member_split"], "raw training")
        sources["raw"] = (rt, rtrain.select(aux_idx), [a for a in s["no_release"] if a not in ("cosine", "procrustes")])
        info["raw"] = raw.what
    public_ckpt = s.get("public_ckpt")
    if "public" in s["no_release_sources"] and public_ckpt:
        from cxr_relink.models.checkpoint import load_embedding_model

        if not Path(str(public_ckpt)).is_file():
            raise FileNotFoundError(f"audit.risk.public_ckpt={public_ckpt}: no such checkpoint")
        pub = load_embedding_model(public_ckpt).to(device).eval()
        pcfg = cfg.copy()
        with open_dict(pcfg):
            pcfg.ckpt_path = str(public_ckpt)
        ptrunk = model_trunk(pcfg, pub)
        pdm = make_datamodule(pcfg, pub)  # the same cohort, prepared for the public model (its tokenizer)
        pt, ptrain = feats(ptrunk, pdm, cfg.split, "public audited"), feats(ptrunk, pdm, s["member_split"], "public training")
        sources["public"] = (pt, ptrain.select(aux_idx), [*s["no_release"], "cosine", "procrustes"])
        refs["members"].append(ptrain.select(mem_idx))
        refs["nonmembers"].append(pt)
        info["public"] = {"checkpoint": str(public_ckpt), "trunk": ptrunk.what}
    elif "public" in s["no_release_sources"]:
        info["public"] = "not run: audit.risk.public_ckpt is not set (no trunk trained on public data only was given)"
    log.info("risk: %d audited studies, %d aux (of %d training), %d members; no-release sources %s",
             target.n_studies, aux.n_studies, train.n_studies, members.n_studies, list(sources))
    sec = risk_audit(target, aux, rel.audit, members=members, nonmembers=target, n_aux=int(s["n_aux"]),
                     n_draws=int(s["n_draws"]), attacks=tuple(s["attacks"]), k=int(s["k"]), n=s["n"],
                     seed=int(s["seed"]), head=s["head"], ridge=s["ridge"], pool=s["pool"], n_boot=int(s["n_boot"]),
                     no_release_sources=sources, member_references=refs["members"],
                     nonmember_references=refs["nonmembers"], label_match=bool(s["label_match"]),
                     label_mapping=s["label_mapping"], fprs=tuple(s["fprs"]))
    sec.update(trunk=trunk.what, no_release_info=info, splits={
        "audited": cfg.split, "member_split": s["member_split"], "aux_fraction": float(s["aux_fraction"]),
        "n_aux_pool": aux.n_studies, "n_members": members.n_studies, "n_nonmembers": target.n_studies})
    return sec


def not_computed(why_model: str) -> dict[str, str]:
    """What audit=risk cannot compute from embeddings alone, and why (evaluate.py records it)."""
    return {"release_attributable": f"needs the model's trunk features and the attacker's aux pairs ({why_model})",
            "memorisation": f"needs the model and its training split ({why_model})"}


__all__ = ["NO_RELEASE", "RawTrunk", "not_computed", "risk_section", "split_by_patient"]
