"""Audit a model: `python evaluate.py audit=standard|hardneg|probe|all ckpt_path=... [data=...]`
or `python evaluate.py audit=hardneg model=hf_clip|open_clip model.path=/models/x` (an existing
vision-language model from a local folder, models/external.py), or `python evaluate.py audit=hardneg
embeddings=path.npz` (precomputed embeddings of any model; `python -m experiments.export_embeddings`
writes them).

The work is `evaluate(cfg)`, which tests call with a composed config; `main()` is the Hydra
entry point. Writes `audit.json` (audit/result.py schema), `recall_vs_n.png` and
`report.md` into the output directory and prints the table (aggregate numbers only). The audit
settings come from configs/audit/ (defaults: audit/settings.py, shared with the callbacks).

embeddings=path.npz holds one row per image item:
  image_emb [I, D], report_emb [I, D] (the row's study report; rows of a study are collapsed),
  study_id [I], patient_id [I] (ints or fixed-width strings; no pickled objects),
  labels [I, 14] over CHEXPERT_LABELS (optional unless hard negatives or the probe run),
  report_text_hash [I] (optional, enables the dedup variant), split [I] (optional:
  "train" rows train the probe, rows equal to `split=` are audited; without it every row is
  audited and the result says split='all').
Rows of one study must agree (report embedding, labels, hash); ids may not be blank (NaN, "").
audit=report_quality also reads report_id [I] (optional, fixed-width strings: the study id of the
row's report in the `data=` cohort, which brings the reports' labels, texts and findings; default
study_id) and retrieves from the "train" rows' reports (docs/report_quality.md).
The probe trains on a seeded random subset of at most max_train_samples train rows.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cxr_relink import configs  # noqa: E402, F401  (sets CXR_RELINK_ROOT)
from cxr_relink.configs import cli  # noqa: E402
from cxr_relink.callbacks.console import quiet_known_warnings  # noqa: E402
from cxr_relink.audit import result as R  # noqa: E402
from cxr_relink.audit.embeddings import EmbeddingSet, as_embeddings, check_ids, check_labels_array, reject_zero_rows  # noqa: E402
from cxr_relink.audit.relinkage import Relinkage  # noqa: E402

log = logging.getLogger("evaluate")

NPZ_REQUIRED = ("image_emb", "report_emb", "study_id", "patient_id")


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an embeddings file, each checked (dtype, rows) with errors naming the key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    data = {}
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # not an .npz (a pickle, a checkpoint, a truncated file)
        raise ValueError(f"embeddings file {path} is not a readable .npz of arrays ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); write it with numpy.savez") from None
    if not hasattr(npz, "files"):
        raise ValueError(f"embeddings file {path} holds one array, not an .npz of named arrays; write it with numpy.savez")
    with npz as z:
        for k in z.files:
            try:
                data[k] = z[k]
            except ValueError as e:  # object arrays need pickle, which is refused (untrusted files)
                raise ValueError(f"embeddings file {path}: {k} cannot be read without pickle ({e}); store it as "
                                 "numbers or fixed-width strings") from None
    missing = [k for k in NPZ_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"embeddings file {path} lacks {missing}; it needs {list(NPZ_REQUIRED)} "
                         "(+ labels, report_text_hash, split optional)")
    n = len(data["image_emb"])
    for k, v in data.items():
        if v.ndim == 0 or len(v) != n:
            raise ValueError(f"embeddings file {path}: {k} has {len(v) if v.ndim else 0} rows but image_emb has {n}")
    for k in ("split", "report_text_hash"):
        if k in data and data[k].dtype.kind not in "US":
            raise ValueError(f"embeddings file {path}: {k} has dtype {data[k].dtype}; expected strings")
    check_ids(data["study_id"], "study_id", n)
    check_ids(data["patient_id"], "patient_id", n)
    if "labels" in data:
        check_labels_array(data["labels"], "labels", n)
    return data


def _rows(data: dict[str, np.ndarray], mask: np.ndarray | None) -> dict[str, np.ndarray]:
    if mask is None:
        return data
    idx = np.flatnonzero(mask)
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:  # one contiguous block (files written by split): views
        return {k: v[idx[0] : idx[-1] + 1] for k, v in data.items()}
    return {k: v[mask] for k, v in data.items()}


def _probe_inputs(data: dict[str, np.ndarray], ev: dict[str, np.ndarray], probe_cb) -> tuple[dict | None, str | None]:
    """The probe's training rows (a seeded random subset of at most max_train_samples), or why the
    probe cannot run. Checked before any audit is computed. Rows that would make its result wrong
    (zero vectors, a study in both train and evaluated rows) raise."""
    from cxr_relink.audit.probe import probe_skip_reason, subsample_rows  # torchmetrics: seconds, only when probing

    if "split" not in data:
        return None, ("the linear probe needs train-split rows: add a `split` array with 'train' rows to the "
                      "embeddings file")
    splits = data["split"].astype(str)
    is_train = splits == "train"
    if not is_train.any():
        from cxr_relink.audit.embeddings import close_names

        present = sorted(set(splits))
        close = close_names("train", present)
        return None, (f"the linear probe needs rows with split == 'train' (splits present: {present})"
                      + (f"; is {close[0]!r} the train split? name it 'train' in the file" if close else ""))
    if "labels" not in data:
        return None, "the linear probe needs `labels` [I, 14] in the embeddings file"
    tr = _rows(data, is_train)
    s = probe_cb.settings
    why = probe_skip_reason(tr["labels"], ev["labels"], eval_labels=s["eval_labels"], uncertain=s["uncertain"],
                            blank=s["blank"])
    if why:
        return None, f"linear probe: {why}"
    reject_zero_rows(as_embeddings(tr["image_emb"], "probe train embeddings"), "probe train embeddings")
    # The same study on both sides would score the probe on what it was fitted to.
    leaked = np.intersect1d(tr["study_id"], ev["study_id"])
    if leaked.size:
        raise ValueError(f"{leaked.size} study_id(s) have rows in both the train split and the evaluated split "
                         f"(e.g. {leaked[:3].tolist()}): the probe would be tested on its training studies")
    shared = np.intersect1d(tr["patient_id"], ev["patient_id"])
    if shared.size:
        log.warning("%d patient_id(s) have studies in both the train and the evaluated split: splits should be by "
                    "patient", shared.size)
    idx = subsample_rows(len(tr["image_emb"]), s["max_train_samples"], s["seed"])
    return {k: v[idx] for k, v in tr.items()}, None


def audit_embeddings(cfg: DictConfig, rel_cb, probe_cb, data: dict[str, np.ndarray] | None = None
                     ) -> tuple[dict, dict | None, dict]:
    """The audits on a file of precomputed embeddings (or on ``data``, its arrays: an existing model's,
    audit_model_embeddings), with the callbacks' settings. Everything is validated before any audit is
    computed."""
    data = load_embeddings(cfg.embeddings) if data is None else data
    split = cfg.get("split")
    mask = None
    if "split" in data:
        mask = data["split"].astype(str) == str(split)
        if not mask.any():
            from cxr_relink.audit.embeddings import close_names

            present = sorted(set(data["split"].astype(str)))
            close = close_names(str(split), present)
            raise ValueError(f"embeddings file {cfg.embeddings} has no rows with split == {split!r} (splits present: "
                             f"{present})" + (f"; did you mean split={close[0]}?" if close else ""))
    else:
        # No split array: every row is audited; say so instead of calling it `split`.
        log.info("embeddings file has no `split` array: auditing all %d rows (meta split='all')",
                 len(data["image_emb"]))
        split = "all"
    ev = _rows(data, mask)
    # Errors name the file's row numbers, not the positions within the audited split.
    es = EmbeddingSet.from_items(ev["image_emb"], ev["report_emb"], ev["study_id"], ev["patient_id"],
                                 ev.get("labels"), ev.get("report_text_hash"),
                                 rows=None if mask is None else np.flatnonzero(mask))
    if any(cb.settings["n_boot"] for cb in (rel_cb, probe_cb) if cb is not None) and np.unique(ev["patient_id"]).size < 2:
        raise ValueError(f"embeddings file {cfg.embeddings}: every audited row has patient_id "
                         f"{ev['patient_id'][0].item()!r}; the bootstrap over patients would resample one cluster and "
                         "its 95% CIs collapse to a point: give real patient ids (or n_boot=0: no intervals)")
    meta: dict[str, Any] = {"source": "embeddings", "embeddings": str(cfg.embeddings), "split": split,
                            "n_items": int(len(ev["image_emb"]))}
    train_rows = None
    if probe_cb is not None:
        train_rows, why = _probe_inputs(data, ev, probe_cb)
        if why and rel_cb is None:
            raise ValueError(why)
        if why:
            log.warning("%s: probe skipped, the re-linkage audit runs", why)
            meta["skipped"] = {"probe": why}
    rel = None
    if rel_cb is not None:
        skipped = rel_cb.skipped(es)  # hard negatives without labels, dedup without report hashes
        for variant, reason in skipped.items():
            log.warning("re-linkage audit: %s skipped: %s", variant, reason)
        if skipped:
            meta["skipped"] = {**meta.get("skipped", {}), **skipped}
        rel = rel_cb.audit(es, skipped=skipped)
        meta.update(n_studies=es.n_studies)
    probe = None
    if train_rows is not None:
        probe = probe_cb.probe(train_rows["image_emb"], train_rows["labels"], ev["image_emb"], ev["labels"],
                               ev["patient_id"])
    return rel, probe, meta


def external_model_path(cfg: DictConfig) -> str | None:
    """`model.path` of an existing model's config (configs/model/hf_clip.yaml, open_clip.yaml), else None."""
    return OmegaConf.select(cfg, "model.path", default=None)


def allow_partial_load(cfg: DictConfig) -> bool:
    """`model.allow_partial_load`: audit a model whose weights did not fully load, flagged (models/load_guard.py)."""
    return bool(OmegaConf.select(cfg, "model.allow_partial_load", default=False))


def load_audited_module(cfg: DictConfig):
    """The model to audit, an embedding model (models/contract.py): the checkpoint's
    (models/checkpoint.py) or an existing model's (models/external.py)."""
    if cfg.get("ckpt_path"):
        from cxr_relink.models.checkpoint import load_embedding_model

        # `+model.<key>=...` changes one of the checkpoint's hyper-parameters, e.g. a moved LLM base
        # folder (`+model.text_tower.pretrained=/new/dir`; its fingerprint must still match).
        overrides = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                     if k not in ("tokenizer_spec", "allow_partial_load")}  # (tokenizer_spec: the data configs'
        # key, configs/evaluate.yaml; allow_partial_load: `+model.allow_partial_load=true`, models/load_guard.py)
        return load_embedding_model(cfg.ckpt_path, overrides=overrides or None, allow_partial_load=allow_partial_load(cfg))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not str(model_cfg.get("_target_", "")).startswith("models.external."):
        raise ValueError(f"model={model_cfg.get('_target_')} is a model to train: evaluate.py audits a checkpoint "
                         "(ckpt_path=...), an existing model (model=hf_clip|open_clip model.path=...) or embeddings")
    model_cfg.pop("tokenizer_spec", None)
    from cxr_relink.models.contract import as_embedding_model

    return as_embedding_model(instantiate(model_cfg), f"model={model_cfg['_target_']}")


def prepared_datamodule(cfg: DictConfig, module):
    """The `data=` cohort's datamodule, set up to feed `module` (its test_dataloader serves `split`)."""
    dm = instantiate(cfg.data, test_split=cfg.split)  # test_dataloader serves the audited split
    dm.tokenizer = module.tokenizer  # the checkpoint's tokenizer, whatever the cohort
    # ... and its preprocessing (image size, normalisation, text field, max length; an existing
    # model's own image transform): a model is only audited on inputs prepared the way it expects.
    for key, value in (module.data_preprocessing or {}).items():
        if getattr(dm, key, value) != value:
            log.info("using the model's data.%s=%r (the data config says %r)", key, value, getattr(dm, key))
            setattr(dm, key, value)
    dm.setup("test")
    return dm


def runs_trainer(cfg: DictConfig) -> bool:
    """Whether the audit runs Trainer.test with the audits as callbacks (a checkpoint; an existing model
    under audits that need the model itself, or with cache_embeddings=false), or the audit library alone
    on embeddings (a file, or an existing model's, cached): then Lightning is never imported."""
    if cfg.get("embeddings"):
        return False
    if cfg.get("ckpt_path") or not cfg.get("cache_embeddings", True):
        return True
    if allow_partial_load(cfg):  # what did not load is known only to the loaded model: no cached rows
        return True
    return bool(cfg.audit.get("adaptive") or cfg.audit.get("report_quality"))


def _device(cfg: DictConfig):
    import torch

    gpu = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu")) in ("gpu", "cuda", "auto")
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def audit_model_embeddings(cfg: DictConfig, rel_cb, probe_cb) -> tuple[dict | None, dict | None, dict]:
    """An existing model (model.path) audited by the library on its embeddings, read from the cache
    (models/embedding_cache.py: per model files, model config, cohort, split and rows) or encoded once
    and stored: a second audit of the same model, or the ladder, encodes nothing and loads no model."""
    from cxr_relink.audit.probe import subsample_rows
    from cxr_relink.models.embedding_cache import cached_rows, encode_split

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    selections: list[tuple[str, str]] = [(str(cfg.split), "all")]
    subsample: dict[str, tuple[int, int]] = {}
    if probe_cb is not None:  # the probe's training rows: the seeded subsample LinearProbe would encode
        ps = probe_cb.settings
        rows = f"subsample {ps['max_train_samples']} seed {ps['seed']}"
        subsample[rows] = (ps["max_train_samples"], ps["seed"])
        selections.append((ps["train_split"], rows))

    def encode(missing: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
        module = load_audited_module(cfg)
        device = _device(cfg)
        module.to(device).eval()
        dm = prepared_datamodule(cfg, module)
        out = {}
        for split, rows in missing:
            idx = None if rows == "all" else subsample_rows(len(dm.eval_dataloader(split).dataset), *subsample[rows])
            out[(split, rows)] = encode_split(module, dm, split, device, idx)
            log.info("encoded %d %s rows of %s", len(out[(split, rows)]["image_emb"]), split, model_cfg["path"])
        return out

    studies: dict[str, list] = {}

    def cohort(sel: tuple[str, str]) -> dict[str, np.ndarray]:  # the selection's rows, as the datamodule orders them
        from cxr_relink.datamodules.records import SPLITS
        from cxr_relink.models.embedding_cache import cohort_rows

        if not studies:
            studies.update({s: [] for s in SPLITS})
            for st in instantiate(cfg.data.reader).load():
                studies[st.split].append(st)
        split, rows = sel
        if split not in studies:
            raise ValueError(f"split={split}: no such split; expected one of {list(studies)}")
        n = sum(len(st.images) for st in studies[split])
        idx = None if rows == "all" else subsample_rows(n, *subsample[rows])
        return cohort_rows(studies[split], str(OmegaConf.select(cfg, "data.text_field", default="report")), idx)

    data, info = cached_rows(cfg.paths.cache_dir, model_cfg, OmegaConf.to_container(cfg.data, resolve=True),
                             selections, encode, cohort)
    rel, probe, meta = audit_embeddings(cfg, rel_cb, probe_cb, data=data)
    meta.pop("embeddings", None)
    path = Path(str(model_cfg["path"]))
    meta.update({"source": "model", "model": f"{model_cfg['family']}:{path.name}", "model_path": str(path),
                 "split": cfg.split, "embeddings_cache": {"files": info["cache"], "encoded": info["encoded"]}})
    cohort = OmegaConf.select(cfg, "data.reader.cohort")
    if cohort is not None:
        meta["cohort"] = cohort
    from cxr_relink.models.external import preprocessing_unproven

    meta["preprocessing_unproven"] = preprocessing_unproven(**model_cfg)
    # A model released by the DP stage carries its privacy record beside its weights (as
    # models.external.ExternalDualEncoder reads it): it travels with every audit of it.
    record = path / "dp_record.json"
    if path.is_dir() and record.is_file():
        meta["privacy"] = json.loads(record.read_text())
    return rel, probe, meta


def audit_checkpoint(cfg: DictConfig, rel_cb, probe_cb, rq_cb=None) -> tuple[dict | None, dict | None, dict]:
    """Trainer.test of the checkpoint's (or existing model's) module on `split` of the `data=` cohort,
    audits as callbacks; an existing model whose audits need no Trainer: audit_model_embeddings."""
    if not runs_trainer(cfg):
        return audit_model_embeddings(cfg, rel_cb, probe_cb)
    import lightning as L  # only here, where a Trainer runs (seconds of start-up)

    module = load_audited_module(cfg)
    dm = prepared_datamodule(cfg, module)
    callbacks = [cb for cb in (rel_cb, probe_cb, rq_cb) if cb is not None]
    from cxr_relink.callbacks.progress import Progress

    every = float(cfg.get("progress_every_s", 30) or 0)  # a progress line every ~30 s (callbacks/progress.py)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[
        Progress(every, enabled=every > 0, test_what=f"audit ({cfg.split} split)"), *callbacks])
    trainer.test(module, datamodule=dm, verbose=False)
    if not trainer.is_global_zero:  # under DDP only rank 0 holds the results and writes them
        return None, None, None
    from cxr_relink.audit.bundle import callback_sections

    sec = callback_sections([cb.last_result for cb in callbacks])
    rel, probe = sec["relinkage"], sec["probe"]
    if cfg.get("ckpt_path"):
        meta: dict[str, Any] = {"source": "checkpoint", "checkpoint": str(cfg.ckpt_path),
                                "model": type(module).__name__, "split": cfg.split, "epoch": module.saved_epoch}
    else:
        meta = {"source": "model", "model": f"{module.family}:{Path(module.path).name}", "model_path": module.path,
                "split": cfg.split}
    # Audits the split could not support (no labels: hard negatives, probe), with the reason.
    if sec["skipped"]:
        meta["skipped"] = sec["skipped"]
    cohort = OmegaConf.select(cfg, "data.reader.cohort")
    if cohort is not None:
        meta["cohort"] = cohort
    if rel_cb is not None:
        meta.update({k: v for k, v in rel_cb.last_result["meta"].items() if k.startswith("n_")})
    if cfg.audit.get("adaptive"):  # the adaptive attacker on the frozen trunk (callbacks/adaptive.py)
        from cxr_relink.callbacks.adaptive import adaptive_section

        from cxr_relink.callbacks.progress import heartbeat

        with heartbeat("running the adaptive attacker (fitting attacks, auditing each)", every):
            meta["adaptive"] = adaptive_section(cfg, module, dm, prepared_datamodule)
    if sec["report_quality"] is not None:  # evaluate() pops it into the result's report_quality section
        meta["report_quality"] = sec["report_quality"]
    if module.load_notes:  # allow_partial_load: audit/result.py flags every section
        meta["weights_not_loaded"] = list(module.load_notes)
    if module.preprocessing_notes:  # an existing model's (models/external.py)
        meta["preprocessing_unproven"] = list(module.preprocessing_notes)
    # A DP checkpoint's privacy statement (saved at training time) travels with every audit of it.
    if module.saved_dp_state is not None:
        meta["privacy"] = module.saved_dp_state
    return rel, probe, meta


def audit_report_quality_embeddings(cfg: DictConfig, rq) -> dict:
    """The report-quality section of an embeddings file, its report ids joined to the `data=` cohort."""
    from cxr_relink.audit.report_quality import audit_embedding_rows

    studies = instantiate(cfg.data.reader).load()
    return audit_embedding_rows(rq, load_embeddings(cfg.embeddings), cfg.get("split"), studies,
                                OmegaConf.select(cfg, "data.text_field", default="report"))


def check_inputs(cfg: DictConfig) -> None:
    """Exactly one thing to audit, and it exists; otherwise a UsageError (the CLI: one line, exit status 2)."""
    given = {"ckpt_path": cfg.get("ckpt_path"), "embeddings": cfg.get("embeddings"), "model.path": external_model_path(cfg)}
    named = {k: v for k, v in given.items() if (v is not None if k == "model.path" else bool(v))}
    if len(named) != 1:
        raise cli.UsageError("give exactly one of ckpt_path=<model checkpoint>, model=hf_clip|open_clip "
                             "model.path=<folder> or embeddings=<file.npz>" + (f" (given: {', '.join(named)})" if named else ""))
    ((key, value),) = named.items()
    if not Path(str(value)).exists():
        raise cli.UsageError(f"{key}={value}: no such {'folder' if key == 'model.path' else 'file'}")
    if key != "embeddings":  # (an embeddings file may name its splits as it likes: audit_embeddings checks)
        from cxr_relink.datamodules.records import SPLITS

        split = str(cfg.get("split"))
        if split not in SPLITS:
            close = difflib.get_close_matches(split, SPLITS, n=1)
            raise cli.UsageError(f"split={split}: no such split of the cohort; choose one of {', '.join(SPLITS)}"
                                 + (f" (did you mean split={close[0]}?)" if close else ""))


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    quiet_known_warnings()
    check_inputs(cfg)
    audit = cfg.audit
    # Embeddings (a file, or an existing model's, cached) are audited by the audit library alone: no
    # Lightning, whose import costs seconds of start-up, and nothing drawn at random outside the audits'
    # seeded bootstrap and probe subsample. A Trainer runs only for a checkpoint (runs_trainer).
    library = not runs_trainer(cfg)
    if not library:
        import lightning as L

        quiet_known_warnings()  # again: Lightning's own log handlers exist only once it is imported
        L.seed_everything(cfg.seed, workers=True)
    rel_cb = ((Relinkage.from_config if library else instantiate)(audit.relinkage)
              if audit.get("relinkage") else None)
    probe_cb = None
    if audit.get("probe"):
        from cxr_relink.audit.probe import Probe

        probe_cb = (Probe.from_config if library else instantiate)(audit.probe)
    rq_cb = None
    if audit.get("report_quality"):
        from cxr_relink.audit.report_quality import ReportQuality

        rq_cb = (ReportQuality.from_config if library else instantiate)(audit.report_quality)
    if rel_cb is None and probe_cb is None and rq_cb is None:
        raise ValueError("audit config enables none of `relinkage`, `probe`, `report_quality`")
    if cfg.get("embeddings"):
        if audit.get("adaptive"):
            raise ValueError("audit=adaptive needs the model (ckpt_path=... or model=hf_clip|open_clip model.path=...): "
                             "an embeddings file holds no trunk features to fit an attack on")
        rel, probe, meta = audit_embeddings(cfg, rel_cb, probe_cb)
        if rq_cb is not None:
            meta["report_quality"] = audit_report_quality_embeddings(cfg, rq_cb)
    else:
        rel, probe, meta = audit_checkpoint(cfg, rel_cb, probe_cb, rq_cb)
        if meta is None:
            return {}, {}
    from cxr_relink.audit.bundle import final_bundle

    # What the chosen audit config leaves out on purpose (audit=all: the adaptive attacker), with why:
    # the headline and report.md say so, as for an audit the data could not support.
    for name, why in (audit.get("not_included") or {}).items():
        if not audit.get(name):
            log.info("%s not run: %s", name, why)
            meta["skipped"] = {**(meta.get("skipped") or {}), name: str(why)}
    out = Path(cfg.output_dir)
    res = final_bundle(out, meta, {"audit": OmegaConf.to_container(audit, resolve=True)}, relinkage=rel, probe=probe,
                       privacy=meta.pop("privacy", None), report_quality=meta.pop("report_quality", None),
                       adaptive=meta.pop("adaptive", None), logger=log)
    return R.scalars(res), {"cfg": cfg, "result": res, "output_dir": str(out)}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    with cli.usage_errors():
        evaluate(cfg)


if __name__ == "__main__":
    cli.run(main, "evaluate.yaml")  # usage mistakes: one clear message naming the valid choices, exit status 2
