"""Lightning glue that runs the audit library (audit/) on an evaluation split: collect -> gather ->
run the audit -> broadcast -> log.

Both callbacks collect what ``validation_step`` / ``test_step`` return
(audit.embeddings.validation_outputs: "image_emb", "report_emb", "labels", "study_idx", "patient_idx",
"index"), gather it across ranks, drop the duplicates a padding DistributedSampler adds (by the dataset
``index``), sort by ``index`` (so the result does not depend on the world size), run the audit on rank 0
(every ``every_n_epochs`` and at the last epoch while fitting; always under ``trainer.validate`` and ``trainer.test``),
broadcast the scalars so every rank logs the same values (they can be monitored) and log them:
validation under ``audit/...`` / ``probe/...``, the test stage under ``test/...``.

Validation epochs also write a versioned JSON result and the Recall-vs-N plot into ``<run>/audit/`` as
``val_<name>_epoch=NNN.json`` (NNN is Lightning's 0-based epoch, as in ``checkpoints/epoch_NNN.ckpt``);
the plot goes to W&B (key ``audit/recall_vs_n``) when a WandbLogger is attached. Under ``trainer.test``
(train.py's final audit, evaluate.py) the callbacks only keep ``last_result`` and the caller writes the
one bundle (audit.result.write_bundle). Audits that need labels (hard negatives, the probe) are skipped
with one logged reason when the split has none (e.g. Open-I without a labels file), recorded in
``meta["skipped"]``. Report text never leaves memory: dedup uses hashes. The audit settings and their
defaults live in audit/settings.py (configs.audit_settings), shared with evaluate.py and bench/.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from cxr_relink.audit import result as R
from cxr_relink.audit.embeddings import VALIDATION_KEYS, EmbeddingSet, embedding_set_from_outputs, report_hash
from cxr_relink.audit.labels import has_labels
from cxr_relink.audit.probe import Probe, subsample_rows
from cxr_relink.audit.relinkage import Relinkage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- collection


def gather_varsize(trainer: Trainer, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """all_gather of tensors whose first dimension differs across ranks (padded, trimmed)."""
    if trainer.world_size <= 1:
        return t
    x = t.to(device)
    n = torch.tensor([x.shape[0]], device=device)
    sizes = trainer.strategy.all_gather(n).reshape(-1).tolist()
    m = max(sizes)
    if x.shape[0] < m:
        pad = torch.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=device)
        x = torch.cat([x, pad])
    g = trainer.strategy.all_gather(x)  # [W, m, ...]
    return torch.cat([g[r, : sizes[r]] for r in range(len(sizes))]).cpu()


class _Collector:
    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)
        self.reset()

    def reset(self) -> None:
        self.buf: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}

    def add(self, outputs: Any, who: str) -> None:
        if not isinstance(outputs, dict):
            raise TypeError(f"{who}: validation_step/test_step must return a dict with keys {list(self.keys)}, "
                            f"got {type(outputs).__name__}")
        missing = [k for k in self.keys if k not in outputs]
        if missing:
            raise KeyError(f"{who}: validation_step/test_step output lacks {missing} (needs {list(self.keys)})")
        for k in self.keys:
            v = outputs[k]
            v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
            self.buf[k].append(v.detach().cpu())

    def gather(self, trainer: Trainer, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
        """Concatenate, gather across ranks, drop padding duplicates by index, sort by index."""
        local = {}
        for k in self.keys:
            if self.buf[k]:
                local[k] = torch.cat(self.buf[k])
            else:  # a rank with no batch still has to join the collectives
                local[k] = torch.zeros((0,), dtype=torch.float32)
        if not self.buf[self.keys[0]] and trainer.world_size <= 1:
            raise ValueError("no validation outputs were collected: is the evaluation split empty?")
        full = {k: gather_varsize(trainer, v, device) for k, v in local.items()}
        idx = full["index"].reshape(-1).long().numpy()
        _, first = np.unique(idx, return_index=True)  # sorted by index, first occurrence
        keep = torch.as_tensor(first)
        dropped = int(idx.size - first.size)
        return {k: v[keep] for k, v in full.items()}, dropped


def _testing(trainer: Trainer) -> bool:
    return trainer.state.fn == TrainerFn.TESTING


def _is_due(trainer: Trainer, every_n_epochs: int) -> bool:
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    return due_epoch(trainer.current_epoch + 1, every_n_epochs, trainer.max_epochs)


def due_epoch(epoch: int, every_n_epochs: int, max_epochs: int | None) -> bool:
    """Whether the 1-based ``epoch`` of a fit is audited: every n-th, and the last one (so a sparse
    schedule still reports the trained model); never for n <= 0."""
    return every_n_epochs > 0 and (epoch % every_n_epochs == 0 or epoch == max_epochs)


def _run_dir(trainer: Trainer, out_dir: str | None) -> str:
    if out_dir:
        return out_dir
    base = trainer.log_dir or trainer.default_root_dir
    return os.path.join(base, "audit")


def _split_name(trainer: Trainer, cb: Any) -> str:
    """The split being evaluated: the datamodule's ``test_split`` under ``trainer.test``, its
    ``val_split`` otherwise (``cb.split`` / "test" when the datamodule names none)."""
    dm = trainer.datamodule
    if _testing(trainer):
        return str(getattr(dm, "test_split", None) or "test")
    return str(getattr(dm, "val_split", None) or cb.split)


def _log_scalars(pl_module: LightningModule, values: dict[str, float], prefix: str) -> None:
    for name, v in values.items():
        pl_module.log(prefix + name, float(v), on_step=False, on_epoch=True, sync_dist=False, prog_bar=False)


def _stem(trainer: Trainer, name: str, split: str) -> str:
    # The split leads the file name, so validation files never pass for test results.
    if trainer.state.fn == TrainerFn.FITTING:
        return f"{split}_{name}_epoch={trainer.current_epoch:03d}"
    return f"{split}_{name}"


def report_hashes(studies: Sequence[Any], text_field: str = "report") -> list[str]:
    """audit.embeddings.report_hash of the text the model sees for each study (the ``text_field`` the
    datamodule uses, so identical impressions collapse when the model reads impressions)."""
    from cxr_relink.datamodules.datamodule import study_text

    return [report_hash(study_text(s, text_field)) for s in studies]


# --------------------------------------------------------------------------- callbacks


class _CollectingCallback(Callback):
    """Collects the evaluation outputs named by ``keys`` on epochs that are due, then gathers them,
    runs the audit on rank 0 (``run_audit``), writes its result (validation only), broadcasts and
    logs the scalars."""

    name = "audit"  # file stem of the per-epoch JSON

    def __init__(self, keys: Sequence[str], every_n_epochs: int, out_dir: str | None, write_json: bool, split: str):
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self.out_dir = out_dir
        self.write_json = write_json
        self.split = split  # label used only when the datamodule names no val_split
        self.last_result: dict[str, Any] | None = None
        self._collector = _Collector(keys)
        self._active = False
        self._loaded_ckpt: dict[str, Any] = {}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # trainer.test(ckpt_path=...) restores weights but not the loops: trainer.current_epoch is
        # still the end of fit, so the audited checkpoint's own epoch is taken from the file.
        self._loaded_ckpt = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}

    # validation and test run the same collection
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = _is_due(trainer, self.every_n_epochs)
        self._collector.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active and dataloader_idx == 0:
            self._collector.add(outputs, type(self).__name__)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._finish(trainer, pl_module)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end

    def _meta(self, trainer: Trainer, pl_module: LightningModule, split: str, dropped: int) -> dict[str, Any]:
        meta = {"model": type(pl_module).__name__, "split": split, "world_size": int(trainer.world_size),
                "n_padding_duplicates_dropped": dropped}
        if _testing(trainer) and trainer.ckpt_path:
            meta.update(checkpoint=os.path.basename(str(trainer.ckpt_path)), epoch=self._loaded_ckpt.get("epoch"),
                        global_step=self._loaded_ckpt.get("global_step"))
        else:  # the weights in memory
            meta.update(epoch=int(trainer.current_epoch), global_step=int(trainer.global_step))
        return meta

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data, dropped = self._collector.gather(trainer, pl_module.device)
        self._collector.reset()
        # trainer.log_dir is itself a collective (a broadcast): resolve it on every rank, never
        # inside the rank-0 block, or rank 0's extra broadcast pairs with the others' scalars.
        out_dir = _run_dir(trainer, self.out_dir)
        split = _split_name(trainer, self)
        payload: tuple[dict[str, float] | None, str | None] = (None, None)
        if trainer.is_global_zero:
            try:
                res = self.run_audit(trainer, pl_module, data, self._meta(trainer, pl_module, split, dropped))
                self.last_result = res
                if not _testing(trainer):
                    self.write(trainer, res, out_dir, split)
                payload = (R.scalars(res), None)
            except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
                payload = (None, f"{type(e).__name__}: {e}")
                if trainer.world_size <= 1:
                    raise
        # An exception on rank 0 must fail every rank, not leave the others waiting at a collective.
        values, error = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            raise RuntimeError(f"{type(self).__name__} failed on rank 0: {error}")
        _log_scalars(pl_module, values, "test/" if _testing(trainer) else "")

    def run_audit(self, trainer: Trainer, pl_module: LightningModule, data: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> dict[str, Any]:
        """The audit result (audit.result.build_result) of the gathered outputs, on rank 0."""
        raise NotImplementedError

    def write(self, trainer: Trainer, res: dict[str, Any], out_dir: str, split: str) -> None:
        if self.write_json:
            os.makedirs(out_dir, exist_ok=True)
            R.write_result(res, os.path.join(out_dir, _stem(trainer, self.name, split) + ".json"))


class RelinkageAudit(_CollectingCallback):
    """Cross-modal re-linkage audit (Recall@K at N, exact), as a validation/test callback.

    ``settings``: any key of audit/settings.py RELINKAGE (ks, ns, directions, hardneg,
    label_mapping, dedup, ties, n_boot, seed, chunk_size, device, fused); that file's values fill in
    the rest. ns: pool sizes, integers and/or "full"; integers >= the number of candidates in the
    split are clipped (the full database covers them; the result lists them in ``clipped_n``). Logs
    ``audit/<variant>/R@K/N=<n>`` and ``.../x_chance`` (see audit/result.py for every name).
    """

    name = "relinkage"

    def __init__(
        self,
        every_n_epochs: int = 1,
        out_dir: str | None = None,
        write_json: bool = True,
        log_plot: bool = True,
        split: str = "val",
        **settings: Any,
    ):
        super().__init__(VALIDATION_KEYS, every_n_epochs, out_dir, write_json, split)
        self.relinkage = Relinkage(**settings)  # the library's audit with these settings
        self.settings = self.relinkage.settings
        self.log_plot = log_plot
        self._warned: set[str] = set()  # variants whose skip was logged (once per run, not per epoch)

    def skipped(self, es: EmbeddingSet) -> dict[str, str]:
        return self.relinkage.skipped(es)

    def audit(self, es: EmbeddingSet, device: str | torch.device | None = None,
              skipped: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        return self.relinkage.audit(es, device, skipped)

    def _text_hashes(self, trainer: Trainer) -> list[str] | None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "studies"):
            rank_zero_warn("RelinkageAudit: dedup needs datamodule.studies(split); dedup skipped")
            return None
        return report_hashes(dm.studies(_split_name(trainer, self)), getattr(dm, "text_field", "report"))

    def run_audit(self, trainer, pl_module, data, meta):
        hashes = self._text_hashes(trainer) if self.settings["dedup"] else None
        es = embedding_set_from_outputs(data, hashes)
        skipped = self.skipped(es)
        for variant in skipped.keys() - self._warned:
            log.warning("re-linkage audit: %s skipped: %s", variant, skipped[variant])
        self._warned |= skipped.keys()
        rel = self.audit(es, pl_module.device, skipped)
        meta.update(n_items=es.n_items, n_studies=es.n_studies, n_patients=int(torch.unique(es.study_patient).numel()))
        if skipped:
            meta["skipped"] = dict(skipped)
        return R.build_result(relinkage=rel, meta=meta, settings=self.settings)

    def write(self, trainer: Trainer, res: dict[str, Any], out_dir: str, split: str) -> None:
        super().write(trainer, res, out_dir, split)
        if not self.log_plot:
            return
        import matplotlib.pyplot as plt

        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, _stem(trainer, self.name, split) + "_recall_vs_n.png")
        fig = R.plot_recall_vs_n(res, png)
        plt.close(fig)
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                lg.log_image(key="audit/recall_vs_n", images=[png], step=trainer.global_step)


class LinearProbe(_CollectingCallback):
    """Linear probe of the frozen image embeddings: ``train_split`` -> evaluation split.

    ``settings``: any key of audit/settings.py PROBE (eval_labels, uncertain, blank, l2,
    max_iter, max_train_samples, train_split, n_boot, seed); that file's values fill in the rest.
    The evaluation embeddings are the validation/test outputs; the probe's training embeddings come
    from ``datamodule.eval_dataloader(train_split, indices)`` encoded with ``pl_module.encode_images``:
    a seeded random subset of at most ``max_train_samples`` images (audit.probe.subsample_rows; the
    first N in loader order would be a biased sample), on rank 0 only. Logs ``probe/macro_auroc``
    and ``probe/auroc/<label>``. Skipped with a logged reason when the labels cannot support it
    (audit.probe.probe_skip_reason). The DP stage sets ``train_split=public``: a probe fitted on
    the DP training units would be a non-private release about them.
    """

    name = "probe"

    def __init__(
        self,
        every_n_epochs: int = 1,
        out_dir: str | None = None,
        write_json: bool = True,
        split: str = "val",
        **settings: Any,
    ):
        super().__init__(("image_emb", "labels", "patient_idx", "index"), every_n_epochs, out_dir, write_json, split)
        self.library = Probe(**settings)  # the library's probe with these settings (what evaluate.py runs on embeddings)
        self.settings = self.library.settings
        self._warned = False

    def probe(self, train_x: Any, train_y: Any, test_x: Any, test_y: Any, test_patient: Any) -> dict[str, Any]:
        """audit.probe.Probe.probe: linear_probe with these settings, on a seeded random subset of at most
        ``max_train_samples`` training rows (evaluate.py passes rows already subsampled)."""
        return self.library.probe(train_x, train_y, test_x, test_y, test_patient)

    def skip_reason(self, train_y: Any, test_y: Any) -> str | None:
        return self.library.skip_reason(train_y, test_y)

    def encode_train(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_dataloader"):
            raise ValueError("LinearProbe needs a datamodule with eval_dataloader(split) for its training embeddings")
        split, s = self.settings["train_split"], self.settings
        n = len(dm.eval_dataloader(split).dataset)
        loader = dm.eval_dataloader(split, indices=subsample_rows(n, s["max_train_samples"], s["seed"]))
        embs, labs = [], []
        with torch.no_grad():
            for batch in loader:
                emb = pl_module.encode_images(batch["image"].to(pl_module.device))
                embs.append(emb.detach().float().cpu())
                labs.append(torch.as_tensor(batch["labels"]).float().cpu())
        if not embs:
            raise ValueError(f"LinearProbe: the probe's training split {split!r} is empty")
        return torch.cat(embs), torch.cat(labs)

    def _skip(self, meta: dict[str, Any], why: str) -> dict[str, Any]:
        if not self._warned:
            log.warning("linear probe skipped: %s", why)  # once per run, not per epoch
            self._warned = True
        meta["skipped"] = {"probe": why}
        return R.build_result(meta=meta, settings=self.settings)

    def run_audit(self, trainer, pl_module, data, meta):
        if not has_labels(data["labels"]):  # no need to encode the training images
            return self._skip(meta, "no labels in the evaluated split")
        xtr, ytr = self.encode_train(trainer, pl_module)
        why = self.skip_reason(ytr.numpy(), data["labels"].numpy())
        if why:
            return self._skip(meta, why)
        probe = self.probe(xtr, ytr.numpy(), data["image_emb"], data["labels"].numpy(), data["patient_idx"].numpy())
        return R.build_result(probe=probe, meta=meta, settings=self.settings)


class ReportQualityAudit(_CollectingCallback):
    """Retrieved-report quality (audit.report_quality): for each image of the evaluation split, the
    report it retrieves is scored against its own: GREEN-exact error counts (synthetic cohort), CheXpert
    label F1 and BLEU-4 / ROUGE-L (docs/report_quality.md).

    ``settings``: any key of audit/settings.py REPORT_QUALITY (database, mode, k, lexical,
    n_boot, seed). With ``database="train"`` (default) the training split's reports are encoded with
    ``pl_module.encode_reports`` on rank 0 at every audited epoch (one text pass over the split);
    ``database="self"`` retrieves from the evaluation split's own reports. Logs
    ``report_quality/green_exact``, ``report_quality/label_micro_f1``, ... (audit/result.py). Report
    texts never leave memory. As a validation callback:
    ``python train.py +callbacks.report_quality._target_=cxr_relink.callbacks.audit.ReportQualityAudit``.
    """

    name = "report_quality"

    def __init__(self, every_n_epochs: int = 1, out_dir: str | None = None, write_json: bool = True,
                 split: str = "val", **settings: Any):
        from cxr_relink.audit.report_quality import ReportQuality

        super().__init__(("image_emb", "report_emb", "study_idx", "patient_idx", "index"), every_n_epochs, out_dir,
                         write_json, split)
        self.report_quality = ReportQuality(**settings)
        self.settings = self.report_quality.settings

    @staticmethod
    def encode_split_reports(trainer: Trainer, pl_module: LightningModule, split: str) -> torch.Tensor:
        """One L2-normalised report embedding per study of ``split`` (datamodule order), from the
        tokens the datamodule prepared for it."""
        dm = trainer.datamodule
        ds = dm.dataset(split, train=False)
        tok = dm.tokenizer
        bs = int(getattr(dm, "eval_batch_size", 64) or 64)
        out = []
        with torch.no_grad():
            for s in range(0, len(ds.input_ids), bs):
                chunk = ds.input_ids[s:s + bs]
                length = max(len(ids) for ids in chunk)
                ids = torch.full((len(chunk), length), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), length), dtype=torch.long)
                for i, t in enumerate(chunk):
                    sl = slice(0, len(t)) if tok.padding_side == "right" else slice(length - len(t), length)
                    ids[i, sl] = torch.as_tensor(t, dtype=torch.long)
                    mask[i, sl] = 1
                emb = pl_module.encode_reports(ids.to(pl_module.device), mask.to(pl_module.device))
                out.append(emb.detach().float().cpu())
        return torch.cat(out)

    def run_audit(self, trainer, pl_module, data, meta):
        from cxr_relink.audit.report_quality import ReportSet

        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "studies"):
            raise ValueError("ReportQualityAudit needs a datamodule with studies(split) (the reports' truth)")
        split = _split_name(trainer, self)
        text_field = getattr(dm, "text_field", "report")
        queries = ReportSet.from_studies(dm.studies(split), text_field)
        study_idx = data["study_idx"].reshape(-1).numpy()
        if self.settings["database"] == "train":
            database = ReportSet.from_studies(dm.studies("train"), text_field)
            db_emb = self.encode_split_reports(trainer, pl_module, "train")
        else:  # the evaluation split's own reports (one row per study that has an image)
            uniq, first = np.unique(study_idx, return_index=True)
            database = queries.subset(uniq)
            db_emb = data["report_emb"][torch.as_tensor(first)]
        sec = self.report_quality.audit(data["image_emb"], study_idx, queries, db_emb, database)
        meta.update(n_items=int(study_idx.size))
        return R.build_result(report_quality=sec, meta=meta, settings=self.settings)
