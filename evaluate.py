"""Audit a model: `python evaluate.py audit=standard|hardneg|probe|all ckpt_path=... [data=...]`
or `python evaluate.py audit=hardneg embeddings=path.npz` (any external model, no checkpoint).

The work is `evaluate(cfg)`, which tests call with a composed config; `main()` is the Hydra
entry point. Writes `audit.json` (audit/result.py schema), `recall_vs_n.png` and
`report.md` into the output directory and prints the table (aggregate numbers only). The audit
settings come from configs/audit/ (defaults: configs/audit/settings/, shared with the callbacks).

embeddings=path.npz holds one row per image item:
  image_emb [I, D], report_emb [I, D] (the row's study report; rows of a study are collapsed),
  study_id [I], patient_id [I] (ints or fixed-width strings; no pickled objects),
  labels [I, 14] over CHEXPERT_LABELS (optional unless hard negatives or the probe run),
  report_text_hash [I] (optional, enables the dedup variant), split [I] (optional:
  "train" rows train the probe, rows equal to `split=` are audited).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import configs  # noqa: E402, F401  (sets CXR_RELINK_ROOT)
from audit import result as R  # noqa: E402
from audit.embeddings import EmbeddingSet  # noqa: E402

log = logging.getLogger("evaluate")

NPZ_REQUIRED = ("image_emb", "report_emb", "study_id", "patient_id")


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    missing = [k for k in NPZ_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"embeddings file {path} lacks {missing}; it needs {list(NPZ_REQUIRED)} "
                         "(+ labels, report_text_hash, split optional)")
    n = len(data["image_emb"])
    for k, v in data.items():
        if len(v) != n:
            raise ValueError(f"embeddings file {path}: {k} has {len(v)} rows but image_emb has {n}")
    return data


def _rows(data: dict[str, np.ndarray], mask: np.ndarray | None) -> dict[str, np.ndarray]:
    return data if mask is None else {k: v[mask] for k, v in data.items()}


def audit_embeddings(cfg: DictConfig, rel_cb, probe_cb) -> tuple[dict, dict | None, dict]:
    """The audits on a file of precomputed embeddings, with the callbacks' settings."""
    data = load_embeddings(cfg.embeddings)
    split = cfg.get("split")
    mask = None
    if "split" in data:
        mask = data["split"].astype(str) == str(split)
        if not mask.any():
            raise ValueError(f"embeddings file has no rows with split == {split!r} "
                             f"(splits present: {sorted(set(data['split'].astype(str)))})")
    ev = _rows(data, mask)
    meta: dict[str, Any] = {"source": "embeddings", "embeddings": str(cfg.embeddings), "split": split,
                            "n_items": int(len(ev["image_emb"]))}
    rel = None
    if rel_cb is not None:
        es = EmbeddingSet.from_items(ev["image_emb"], ev["report_emb"], ev["study_id"], ev["patient_id"],
                                     ev.get("labels"), ev.get("report_text_hash"))
        if rel_cb.settings["dedup"] and es.study_text_hash is None:
            log.warning("dedup requested but the embeddings file has no report_text_hash: dedup skipped")
        rel = rel_cb.audit(es)
        meta.update(n_studies=es.n_studies)
    probe = None
    if probe_cb is not None:
        if "split" not in data or not (data["split"].astype(str) == "train").any():
            raise ValueError("the linear probe needs train-split rows: add a `split` array with 'train' rows "
                             "to the embeddings file")
        if "labels" not in data:
            raise ValueError("the linear probe needs `labels` [I, 14] in the embeddings file")
        tr = _rows(data, data["split"].astype(str) == "train")
        probe = probe_cb.probe(tr["image_emb"], tr["labels"], ev["image_emb"], ev["labels"], ev["patient_id"])
    return rel, probe, meta


def audit_checkpoint(cfg: DictConfig, rel_cb, probe_cb) -> tuple[dict | None, dict | None, dict]:
    """Trainer.validate of the checkpoint's module on `split` of the `data=` cohort, audits as callbacks."""
    from models.checkpoint import load_module

    module = load_module(cfg.ckpt_path)
    dm = instantiate(cfg.data)
    dm.tokenizer = module.tokenizer  # the checkpoint's tokenizer, whatever the cohort
    # ... and its preprocessing (image size, normalisation, text field, max length): a model is only
    # audited on inputs prepared the way it was trained on.
    for key, value in (getattr(module, "data_preprocessing", None) or {}).items():
        if getattr(dm, key, value) != value:
            log.info("using the checkpoint's data.%s=%r (the data config says %r)", key, value, getattr(dm, key))
            setattr(dm, key, value)
    dm.val_split = cfg.split  # val_dataloader serves the audited split
    dm.setup("validate")
    callbacks = [cb for cb in (rel_cb, probe_cb) if cb is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    if not trainer.is_global_zero:  # under DDP only rank 0 holds the results and writes them
        return None, None, None
    rel = rel_cb.last_result["relinkage"] if rel_cb is not None else None
    probe = probe_cb.last_result["probe"] if probe_cb is not None else None
    meta: dict[str, Any] = {"source": "checkpoint", "checkpoint": str(cfg.ckpt_path), "model": type(module).__name__,
                            "split": cfg.split}
    cohort = OmegaConf.select(cfg, "data.reader.cohort")
    if cohort is not None:
        meta["cohort"] = cohort
    if rel_cb is not None:
        meta.update({k: v for k, v in rel_cb.last_result["meta"].items() if k.startswith("n_")})
    # A DP checkpoint's privacy statement (saved at training time) travels with every audit of it.
    if module.saved_dp_state is not None:
        meta["privacy"] = module.saved_dp_state
    return rel, probe, meta


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    L.seed_everything(cfg.seed, workers=True)
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("embeddings")):
        raise ValueError("give exactly one of ckpt_path=<model checkpoint> or embeddings=<file.npz>")
    audit = cfg.audit
    rel_cb = instantiate(audit.relinkage) if audit.get("relinkage") else None
    probe_cb = instantiate(audit.probe) if audit.get("probe") else None
    if rel_cb is None and probe_cb is None:
        raise ValueError("audit config enables neither `relinkage` nor `probe`")
    if cfg.get("embeddings"):
        rel, probe, meta = audit_embeddings(cfg, rel_cb, probe_cb)
    else:
        rel, probe, meta = audit_checkpoint(cfg, rel_cb, probe_cb)
        if meta is None:
            return {}, {}
    settings = {"audit": OmegaConf.to_container(audit, resolve=True)}
    res = R.build_result(relinkage=rel, probe=probe, meta=meta, settings=settings, privacy=meta.pop("privacy", None))
    out = Path(cfg.output_dir)
    table = R.write_bundle(res, out)
    print(table)
    log.info("audit written to %s", out)
    return R.scalars(res), {"cfg": cfg, "result": res, "output_dir": str(out)}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
