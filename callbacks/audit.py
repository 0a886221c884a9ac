"""Lightning glue that runs the audit library (audit/) during validation: collect -> gather ->
run the audit -> broadcast -> log.

Both callbacks collect what ``validation_step`` returns (audit.embeddings.validation_outputs:
"image_emb", "report_emb", "labels", "study_idx", "patient_idx", "index"), gather it across ranks,
drop the duplicates a padding DistributedSampler adds (by the dataset ``index``), sort by ``index``
(so the result does not depend on the world size), run the audit on rank 0 every
``every_n_epochs`` (always under ``trainer.validate``), broadcast the scalars so every rank logs the
same values (they can be monitored), and write a versioned JSON result (and the Recall-vs-N plot)
into the run directory. The plot goes to W&B as an image only when a WandbLogger is attached. Report
text never leaves memory: dedup uses hashes. The audit settings and their defaults live in
configs/audit/settings/ (configs.audit_settings), shared with evaluate.py and bench/.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from audit import result as R
from audit.embeddings import VALIDATION_KEYS, EmbeddingSet, embedding_set_from_outputs, report_hash
from audit.probe import linear_probe
from audit.relinkage import relinkage_audit
from configs import audit_settings


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
            raise TypeError(f"{who}: validation_step must return a dict with keys {list(self.keys)}, got {type(outputs).__name__}")
        missing = [k for k in self.keys if k not in outputs]
        if missing:
            raise KeyError(f"{who}: validation_step output lacks {missing} (needs {list(self.keys)})")
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


def _is_due(trainer: Trainer, every_n_epochs: int) -> bool:
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    return every_n_epochs > 0 and (trainer.current_epoch + 1) % every_n_epochs == 0


def _run_dir(trainer: Trainer, out_dir: str | None) -> str:
    if out_dir:
        return out_dir
    base = trainer.log_dir or trainer.default_root_dir
    return os.path.join(base, "audit")


def _split_name(trainer: Trainer, cb: Any) -> str:
    """The split being validated: the datamodule's ``val_split`` when it has one."""
    dm = trainer.datamodule
    return str(getattr(dm, "val_split", None) or cb.split)


def _log_scalars(pl_module: LightningModule, values: dict[str, float], split: str = "val") -> None:
    # The validation split logs under the stable names (audit/..., probe/...); any other split
    # (the final test audit after training) under "<split>/..." so the two never share a curve.
    prefix = "" if split == "val" else f"{split}/"
    for name, v in values.items():
        name = prefix + name
        pl_module.log(name, float(v), on_step=False, on_epoch=True, sync_dist=False, prog_bar=False)


def _stem(trainer: Trainer, prefix: str) -> str:
    if trainer.state.fn == TrainerFn.FITTING:
        return f"{prefix}_epoch={trainer.current_epoch:03d}"
    return prefix


def report_hashes(studies: Sequence[Any], text_field: str = "report") -> list[str]:
    """audit.embeddings.report_hash of the text the model sees for each study (the ``text_field`` the
    datamodule uses, so identical impressions collapse when the model reads impressions)."""
    from datamodules.datamodule import study_text

    return [report_hash(study_text(s, text_field)) for s in studies]


# --------------------------------------------------------------------------- callbacks


class _CollectingCallback(Callback):
    """Collects the validation outputs named by ``keys`` on epochs that are due, then gathers them,
    runs the audit on rank 0 (``run_audit``), writes its result, broadcasts and logs the scalars."""

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
        data, dropped = self._collector.gather(trainer, pl_module.device)
        self._collector.reset()
        # trainer.log_dir is itself a collective (a broadcast): resolve it on every rank, never
        # inside the rank-0 block, or rank 0's extra broadcast pairs with the others' scalars.
        out_dir = _run_dir(trainer, self.out_dir)
        split = _split_name(trainer, self)
        values: dict[str, float] | None = None
        if trainer.is_global_zero:
            meta = {"model": type(pl_module).__name__, "split": split, "epoch": int(trainer.current_epoch),
                    "global_step": int(trainer.global_step), "world_size": int(trainer.world_size),
                    "n_padding_duplicates_dropped": dropped}
            res = self.run_audit(trainer, pl_module, data, meta)
            self.last_result = res
            values = R.scalars(res)
            self.write(trainer, res, out_dir)
        values = trainer.strategy.broadcast(values, src=0)
        _log_scalars(pl_module, values, split)

    def run_audit(self, trainer: Trainer, pl_module: LightningModule, data: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> dict[str, Any]:
        """The audit result (audit.result.build_result) of the gathered outputs, on rank 0."""
        raise NotImplementedError

    def write(self, trainer: Trainer, res: dict[str, Any], out_dir: str) -> None:
        if self.write_json:
            os.makedirs(out_dir, exist_ok=True)
            R.write_result(res, os.path.join(out_dir, _stem(trainer, self.name) + ".json"))


class RelinkageAudit(_CollectingCallback):
    """Cross-modal re-linkage audit (Recall@K at N, exact), as a validation callback.

    ``settings``: any key of configs/audit/settings/relinkage.yaml (ks, ns, directions, hardneg,
    label_mapping, dedup, ties, n_boot, seed, chunk_size, device, fused); that file's values fill in
    the rest. ns: pool sizes, integers and/or "full"; integers >= the number of candidates in the
    split are clipped (the full database covers them). Logs ``audit/<variant>/R@K/N=<n>`` and
    ``.../x_chance`` (see audit/result.py for every name).
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
        s = audit_settings("relinkage", settings)
        self.settings = {
            "ks": [int(k) for k in s["ks"]], "ns": [n if isinstance(n, str) else int(n) for n in s["ns"]],
            "directions": list(s["directions"]), "hardneg": bool(s["hardneg"]), "label_mapping": s["label_mapping"],
            "dedup": bool(s["dedup"]), "ties": s["ties"], "n_boot": int(s["n_boot"]), "seed": int(s["seed"]),
        }
        self.chunk_size = s["chunk_size"]
        self.device = s["device"]
        self.fused = s["fused"]  # compile the counting step (see audit.counting.rank_counts); results identical
        self.log_plot = log_plot

    def audit(self, es: EmbeddingSet, device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
        """relinkage_audit of ``es`` with these settings (evaluate.py calls it on a file of embeddings);
        the dedup variant runs only when ``es`` carries report hashes."""
        s = self.settings
        return relinkage_audit(es, **{**s, "dedup": s["dedup"] and es.study_text_hash is not None},
                               chunk_size=self.chunk_size, device=self.device or device, fused=self.fused)

    def _text_hashes(self, trainer: Trainer) -> list[str] | None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "studies"):
            rank_zero_warn("RelinkageAudit: dedup needs datamodule.studies(split); dedup skipped")
            return None
        return report_hashes(dm.studies(_split_name(trainer, self)), getattr(dm, "text_field", "report"))

    def run_audit(self, trainer, pl_module, data, meta):
        hashes = self._text_hashes(trainer) if self.settings["dedup"] else None
        es = embedding_set_from_outputs(data, hashes)
        rel = self.audit(es, pl_module.device)
        meta.update(n_items=es.n_items, n_studies=es.n_studies, n_patients=int(torch.unique(es.study_patient).numel()))
        return R.build_result(relinkage=rel, meta=meta, settings=self.settings)

    def write(self, trainer: Trainer, res: dict[str, Any], out_dir: str) -> None:
        super().write(trainer, res, out_dir)
        if not self.log_plot:
            return
        import matplotlib.pyplot as plt

        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, _stem(trainer, self.name) + "_recall_vs_n.png")
        fig = R.plot_recall_vs_n(res, png)
        plt.close(fig)
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="audit/recall_vs_n", images=[png], step=trainer.global_step)


class LinearProbe(_CollectingCallback):
    """Linear probe of the frozen image embeddings: ``train_split`` -> evaluation split.

    ``settings``: any key of configs/audit/settings/probe.yaml (eval_labels, uncertain, blank, l2,
    max_iter, max_train_samples, train_split, n_boot, seed); that file's values fill in the rest.
    The evaluation embeddings are the validation outputs; the probe's training embeddings come from
    ``datamodule.eval_dataloader(train_split)`` encoded with ``pl_module.encode_images`` (at most
    ``max_train_samples`` images, in loader order; on rank 0 only). Logs ``probe/macro_auroc`` and
    ``probe/auroc/<label>``. The DP stage sets ``train_split=public``: a probe fitted on the DP
    training units would be a non-private release about them.
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
        s = audit_settings("probe", settings)
        self.settings = {
            "train_split": str(s["train_split"]),
            "eval_labels": list(s["eval_labels"]) if s["eval_labels"] is not None else None,
            "uncertain": s["uncertain"], "blank": s["blank"], "l2": float(s["l2"]), "max_iter": int(s["max_iter"]),
            "max_train_samples": int(s["max_train_samples"]), "n_boot": int(s["n_boot"]), "seed": int(s["seed"]),
        }

    def probe(self, train_x: Any, train_y: Any, test_x: Any, test_y: Any, test_patient: Any) -> dict[str, Any]:
        """linear_probe with these settings, on at most ``max_train_samples`` training rows
        (evaluate.py calls it on a file of embeddings)."""
        s = self.settings
        cap = s["max_train_samples"]
        return linear_probe(train_x[:cap], train_y[:cap], test_x, test_y, eval_labels=s["eval_labels"],
                            uncertain=s["uncertain"], blank=s["blank"], l2=s["l2"], max_iter=s["max_iter"],
                            test_patient=test_patient, n_boot=s["n_boot"], seed=s["seed"])

    def encode_train(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_dataloader"):
            raise ValueError("LinearProbe needs a datamodule with eval_dataloader(split) for its training embeddings")
        cap = self.settings["max_train_samples"]
        embs, labs, n = [], [], 0
        with torch.no_grad():
            for batch in dm.eval_dataloader(self.settings["train_split"]):
                emb = pl_module.encode_images(batch["image"].to(pl_module.device))
                embs.append(emb.detach().float().cpu())
                labs.append(torch.as_tensor(batch["labels"]).float().cpu())
                n += emb.shape[0]
                if n >= cap:
                    break
        if not embs:
            raise ValueError(f"LinearProbe: the probe's training split {self.settings['train_split']!r} is empty")
        return torch.cat(embs)[:cap], torch.cat(labs)[:cap]

    def run_audit(self, trainer, pl_module, data, meta):
        xtr, ytr = self.encode_train(trainer, pl_module)
        probe = self.probe(xtr, ytr.numpy(), data["image_emb"], data["labels"].numpy(), data["patient_idx"].numpy())
        return R.build_result(probe=probe, meta=meta, settings=self.settings)
