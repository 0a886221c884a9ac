"""Export the embeddings of any model on any cohort to the .npz that `evaluate.py embeddings=...` audits.

    python -m experiments.export_embeddings ckpt_path=run/checkpoints/last.ckpt out=emb.npz
    python -m experiments.export_embeddings model=hf_clip model.path=/models/clip data=mimic_cxr out=emb.npz

The model is loaded and fed exactly as evaluate.py feeds it (evaluate.load_audited_module,
evaluate.prepared_datamodule: a checkpoint's preprocessing, an existing model's own processor and
tokenizer). One row per image item of each split in `splits` (default train + the audited `split`):
image_emb, report_emb, study_id, patient_id (the cohort's own ids), labels, report_text_hash (of the
text the model reads; never the text), split. Auditing the file gives the numbers evaluate.py gives on
the model itself (tests/test_external_models.py). Report text and images never leave memory; the file
holds embeddings, ids and labels: treat it as derived from PHI all the same.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from cxr_relink import configs  # noqa: F401  (sets CXR_RELINK_ROOT)
from cxr_relink.models.embedding_cache import encode_split  # the one encoding of a split's rows (evaluate.py's cache too)

log = logging.getLogger("export_embeddings")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def export_embeddings(cfg: DictConfig) -> Path:
    """Write `cfg.out`; refuses to replace an existing file unless `overwrite`."""
    from cxr_relink.evaluation import external_model_path, load_audited_module, prepared_datamodule

    out = Path(cfg.out)
    if out.suffix != ".npz":
        raise ValueError(f"out={out} must end in .npz (numpy would add the suffix)")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    if cfg.get("embeddings") or bool(cfg.get("ckpt_path")) == (external_model_path(cfg) is not None):
        raise ValueError("give a model: ckpt_path=<checkpoint> or model=hf_clip|open_clip model.path=<folder>")
    module = load_audited_module(cfg)
    device = _device(str(cfg.device))
    module.to(device).eval()
    dm = prepared_datamodule(cfg, module)
    splits = list(dict.fromkeys(str(s) for s in cfg.splits))  # in order, once each
    parts = []
    for split in splits:
        if not dm.studies(split):
            log.warning("split %r is empty: not exported", split)
            continue
        parts.append(encode_split(module, dm, split, device))
        log.info("%s: %d image rows", split, len(parts[-1]["image_emb"]))
    if not parts:
        raise ValueError(f"none of the splits {splits} has studies")
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npz")  # a reader never sees a half-written file
    np.savez(tmp, **data)
    os.replace(tmp, out)
    log.info("wrote %s (%d rows, splits %s)", out, len(data["image_emb"]), splits)
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="export_embeddings.yaml")
def main(cfg: DictConfig) -> None:
    export_embeddings(cfg)


if __name__ == "__main__":
    main()
