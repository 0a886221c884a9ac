"""Audit callbacks end to end with a tiny fake dual encoder: scalar names, JSON, plot, and the
gathered 2-process (gloo, ddp_spawn on CPU, padding DistributedSampler) result equal to the
single-process one."""

from __future__ import annotations

import json
import os
import socket

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cxr_relink.callbacks.audit import LinearProbe, RelinkageAudit
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.relinkage import relinkage_audit
from cxr_relink.audit.result import load_result

DIM = 8
N_STUDIES = 24
N_ITEMS = 37  # odd: a 2-rank DistributedSampler pads one duplicate


def _make_split(seed: int, n_items: int = N_ITEMS, n_studies: int = N_STUDIES):
    rng = np.random.default_rng(seed)
    study = np.concatenate([np.arange(n_studies), rng.integers(0, n_studies, n_items - n_studies)])
    patient = np.arange(n_studies) // 2
    rep = rng.normal(size=(n_studies, DIM)).astype(np.float32)
    img = (rep[study] + 0.8 * rng.normal(size=(n_items, DIM))).astype(np.float32)
    labels = np.zeros((n_studies, 14), np.float32)
    labels[:, 2] = rng.integers(0, 2, n_studies)
    labels[:, 10] = rng.choice([0.0, 1.0, np.nan], n_studies)
    labels[:, 0] = 1 - labels[:, 2]
    return {"img": img, "rep": rep, "study": study, "patient": patient, "labels": labels}


class _Items(Dataset):
    def __init__(self, split):
        self.s = split

    def __len__(self):
        return len(self.s["study"])

    def __getitem__(self, i):
        st = int(self.s["study"][i])
        return {
            "image": torch.from_numpy(self.s["img"][i]),
            "report_vec": torch.from_numpy(self.s["rep"][st]),
            "labels": torch.from_numpy(self.s["labels"][st]),
            "study_idx": st,
            "patient_idx": int(self.s["patient"][st]),
            "index": i,
        }


class _Study:
    def __init__(self, i):
        self.report = f"report text {i % 20}"  # studies i and i+20 share a text

    def text(self, text_field="report"):  # as datamodules.records.Study.text
        return self.report


class FakeDataModule(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.splits = {"train": _make_split(1, 120, 70), "val": _make_split(2)}

    def studies(self, split):
        return [_Study(i) for i in range(len(self.splits[split]["rep"]))]

    def eval_dataloader(self, split, indices=None):
        ds = _Items(self.splits[split])
        return DataLoader(ds if indices is None else torch.utils.data.Subset(ds, indices), batch_size=8, shuffle=False)

    def val_dataloader(self):
        return self.eval_dataloader("val")


class FakeDual(L.LightningModule):
    """Embeddings are a fixed function of the item: identical under any world size."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(DIM, DIM, bias=False)
        torch.nn.init.eye_(self.proj.weight)

    def encode_images(self, image):
        return torch.nn.functional.normalize(self.proj(image), dim=-1)

    def validation_step(self, batch, batch_idx):
        return {
            "image_emb": self.encode_images(batch["image"]),
            "report_emb": torch.nn.functional.normalize(batch["report_vec"], dim=-1),
            "labels": batch["labels"],
            "study_idx": batch["study_idx"],
            "patient_idx": batch["patient_idx"],
            "index": batch["index"],
        }


def _callbacks(out_dir):
    return [
        RelinkageAudit(ks=[1, 5], ns=[10, 100, "full"], hardneg=True, dedup=True, n_boot=100,
                       out_dir=str(out_dir), log_plot=True),
        LinearProbe(n_boot=20, max_train_samples=100, out_dir=str(out_dir)),
    ]


def _validate(out_dir, **trainer_kw):
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(out_dir), callbacks=_callbacks(out_dir),
                        **trainer_kw)
    trainer.validate(FakeDual(), datamodule=FakeDataModule(), verbose=False)
    return trainer


def _comparable(res):
    res = dict(res)
    res.pop("created_utc")
    meta = dict(res.pop("meta"))
    for k in ("world_size", "n_padding_duplicates_dropped"):
        meta.pop(k, None)
    res["meta"] = meta
    return res


def test_single_process_scalars_json_and_plot(tmp_path):
    trainer = _validate(tmp_path, accelerator="cpu", devices=1)
    m = trainer.callback_metrics
    for name in ["audit/i2t/R@1/N=10", "audit/i2t/R@1/N=10/x_chance", "audit/i2t/R@5/N=full",
                 "audit/t2i/R@1/N=10", "audit/hardneg/i2t/R@1/N=10", "audit/hardneg/i2t/R@1/N=10/chance",
                 "audit/dedup/i2t/R@1/N=full", "audit/i2t/mrr", "probe/macro_auroc", "probe/auroc/Cardiomegaly"]:
        assert name in m, name
    assert "audit/i2t/R@1/N=100" not in m  # clipped: the split holds 24 reports
    res = load_result(tmp_path / "val_relinkage.json")
    assert (tmp_path / "val_relinkage_recall_vs_n.png").stat().st_size > 0
    assert res["relinkage"]["i2t"]["clipped_n"] == [100]
    assert res["relinkage"]["dedup/i2t"]["n_unique_reports"] == 20
    # the plumbing hands the metric exactly the validation embeddings
    s = FakeDataModule().splits["val"]
    es = EmbeddingSet.from_items(s["img"], s["rep"][s["study"]], s["study"], s["patient"][s["study"]],
                                 s["labels"][s["study"]])
    ref = relinkage_audit(es, ks=[1, 5], ns=[10, 100, "full"], hardneg=True, n_boot=100)
    for key in ("i2t", "t2i", "hardneg/i2t"):
        got = [r["value"] for r in res["relinkage"][key]["recall"]]
        assert got == pytest.approx([r["value"] for r in ref[key]["recall"]], abs=1e-6)
    assert m["audit/i2t/R@1/N=10"].item() == pytest.approx(res["relinkage"]["i2t"]["recall"][0]["value"], abs=1e-6)
    probe = load_result(tmp_path / "val_probe.json")["probe"]
    assert m["probe/macro_auroc"].item() == pytest.approx(probe["macro_auroc"], abs=1e-6)


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path):
    _validate(tmp_path / "one", accelerator="cpu", devices=1)
    _validate(tmp_path / "two", accelerator="cpu", devices=2, strategy="ddp_spawn")
    for name in ("val_relinkage.json", "val_probe.json"):
        one = json.loads((tmp_path / "one" / name).read_text())
        two = json.loads((tmp_path / "two" / name).read_text())
        assert two["meta"]["world_size"] == 2
        assert two["meta"]["n_padding_duplicates_dropped"] == 1  # 37 items on 2 ranks
        assert _comparable(one) == _comparable(two)


_RANK0_ERROR = "injected rank-0 audit failure 7f3a"
_HANG_S = 60  # a passing run takes < 1 s (fork), 10-25 s (spawn, loaded 2 cores); a hang: gloo's 30 min


def _rank0_fails_worker(rank: int, port: int, out_dir: str, release) -> None:
    """One rank of an externally launched 2-process gloo job (LOCAL_RANK set: Lightning launches
    nothing itself) whose re-linkage audit raises on rank 0 only; writes what validate raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    cb = RelinkageAudit(ks=[1], ns=["full"], hardneg=False, n_boot=10, out_dir=out_dir, log_plot=False)
    if rank == 0:
        def boom(*args, **kwargs):
            raise ValueError(_RANK0_ERROR)

        cb.relinkage.audit = boom  # the library call inside run_audit
    outcome = "validate returned without an exception"
    try:
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  accelerator="cpu", devices=2, strategy="ddp", default_root_dir=out_dir,
                  callbacks=[cb]).validate(FakeDual(), datamodule=FakeDataModule(), verbose=False)
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    if rank == 0:
        # Stay in the process group until rank 1 is done, as a failed NCCL peer looks to the others
        # (under gloo, rank 0's exit would instead break rank 1's broadcast with "connection closed").
        release.wait(2 * _HANG_S)


def test_two_process_rank0_audit_error_fails_every_rank(tmp_path):
    """An exception in rank 0's audit reaches rank 1 through the result broadcast: both ranks
    raise, naming the original error, instead of rank 1 waiting at the broadcast forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported lightning (spawn re-imports it per rank: 8-13 s on a
    # loaded 2-core machine, against < 1 s for the whole run); spawn if a process group is already up here
    fork = "fork" in torch.multiprocessing.get_all_start_methods() and not torch.distributed.is_initialized()
    ctx = torch.multiprocessing.get_context("fork" if fork else "spawn")
    release = ctx.Event()
    procs = [ctx.Process(target=_rank0_fails_worker, args=(r, port, str(tmp_path), release), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[1].join(_HANG_S)
        release.set()
        procs[0].join(10)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:  # never leave a rank behind, whatever failed
        release.set()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    outcomes = {r: (tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists()
                else f"no report (exit code {procs[r].exitcode})" for r in range(2)}
    assert not hung, f"rank(s) {hung} still running {_HANG_S} s after rank 0's audit raised " \
                     f"(waiting at the broadcast?); outcomes: {outcomes}"
    for r, msg in outcomes.items():
        assert "RelinkageAudit failed on rank 0" in msg and f"ValueError: {_RANK0_ERROR}" in msg, outcomes
    assert not (tmp_path / "val_relinkage.json").exists()


def test_bad_validation_outputs_named(tmp_path):
    class NoIds(FakeDual):
        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            out.pop("index")
            return out

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1, default_root_dir=str(tmp_path), callbacks=_callbacks(tmp_path))
    with pytest.raises(KeyError, match="lacks \\['index'\\]"):
        trainer.validate(NoIds(), datamodule=FakeDataModule(), verbose=False)


# --------------------------------------------------------------------------- evaluate.py


def _npz(path, with_split=True, drop=None):
    rng = np.random.default_rng(0)
    parts = []
    for name, n_st, n_items, off in (("train", 120, 180, 0), ("test", 60, 90, 1000)):
        st = np.concatenate([np.arange(n_st), rng.integers(0, n_st, n_items - n_st)])
        rep = rng.normal(size=(n_st, 16)).astype(np.float32)
        lab = (rng.random((n_st, 14)) < 0.3).astype(np.float32)
        lab[:, 4:] = 0  # few distinct label vectors: hard-negative groups with several patients
        img = rep[st] + rng.normal(size=(n_items, 16)).astype(np.float32)
        img[:, :14] += 2 * lab[st]
        parts.append(dict(image_emb=img, report_emb=rep[st], labels=lab[st], study_id=st + off,
                          patient_id=(st + off) // 2, report_text_hash=np.array([f"h{s % 50}" for s in st + off]),
                          split=np.array([name] * n_items)))
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not with_split:
        data.pop("split")
    if drop:
        data.pop(drop)
    np.savez(path, **data)
    return path


def _eval_cfg(overrides):
    from cxr_relink.configs import compose

    return compose("evaluate.yaml", overrides)


def test_evaluate_embeddings_writes_json_plot_report(tmp_path, caplog):
    from cxr_relink.evaluation import evaluate

    npz = _npz(tmp_path / "emb.npz")
    cfg = _eval_cfg([f"embeddings={npz}", "audit=all", f"paths.output_dir={tmp_path / 'out'}",
                     "audit.relinkage.n_boot=50", "audit.probe.n_boot=20"])
    with caplog.at_level("INFO", logger="evaluate"):
        metrics, obj = evaluate(cfg)
    out = tmp_path / "out"
    res = load_result(out / "audit.json")
    assert set(res["relinkage"]) == {"i2t", "t2i", "hardneg/i2t", "dedup/i2t"}
    assert res["relinkage"]["i2t"]["n_candidates"] == 60  # test rows only
    assert (out / "recall_vs_n.png").stat().st_size > 0
    # the console: the headline naming where the files are, then the table once
    assert "Recall@K" in (out / "report.md").read_text() and caplog.text.count("| Recall@K (%) |") == 1
    assert f"Full results: {out}/" in caplog.text
    assert "audit/i2t/R@1/N=full" in metrics and "probe/macro_auroc" in metrics
    assert metrics["probe/macro_auroc"] > 0.7


def test_evaluate_bad_inputs(tmp_path):
    from cxr_relink.evaluation import evaluate

    with pytest.raises(ValueError, match="exactly one of ckpt_path"):
        evaluate(_eval_cfg([f"paths.output_dir={tmp_path}"]))
    npz = _npz(tmp_path / "nolab.npz", drop="patient_id")
    with pytest.raises(ValueError, match="lacks \\['patient_id'\\]"):
        evaluate(_eval_cfg([f"embeddings={npz}", f"paths.output_dir={tmp_path}"]))
    # A file without labels audits what it can: hard negatives are skipped with the reason recorded.
    npz = _npz(tmp_path / "nolabels.npz", drop="labels")
    _, obj = evaluate(_eval_cfg([f"embeddings={npz}", "audit=hardneg", f"paths.output_dir={tmp_path / 'nolabels'}"]))
    assert set(obj["result"]["relinkage"]) == {"i2t", "t2i", "dedup/i2t"}
    assert "no labels" in obj["result"]["meta"]["skipped"]["hardneg/i2t"]
    assert "hardneg/i2t: skipped: no labels" in (tmp_path / "nolabels" / "report.md").read_text().replace("image→report, hard negatives", "hardneg/i2t")
    npz = _npz(tmp_path / "nosplit.npz", with_split=False)
    with pytest.raises(ValueError, match="train-split rows"):
        evaluate(_eval_cfg([f"embeddings={npz}", "audit=probe", f"paths.output_dir={tmp_path}"]))
    npz = _npz(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="no rows with split == 'val'"):
        evaluate(_eval_cfg([f"embeddings={npz}", "split=val", f"paths.output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="unknown label names"):
        evaluate(_eval_cfg([f"embeddings={npz}", "audit=probe", "audit.probe.eval_labels=[Pneumonitis]",
                            f"paths.output_dir={tmp_path}"]))


def test_audits_run_every_nth_and_the_last_epoch_while_fitting() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from cxr_relink.callbacks.audit import _is_due

    def due(every: int, max_epochs: int, fn=TrainerFn.FITTING) -> list[int]:
        return [e for e in range(max_epochs) if _is_due(SimpleNamespace(
            sanity_checking=False, state=SimpleNamespace(fn=fn), current_epoch=e, max_epochs=max_epochs), every)]

    assert due(1, 4) == [0, 1, 2, 3]
    assert due(3, 6) == [2, 5] and due(3, 7) == [2, 5, 6]  # the last epoch always, once
    assert due(10, 4) == [3]
    assert due(0, 4) == []  # 0: never while fitting
    assert due(0, 2, TrainerFn.TESTING) == [0, 1]  # trainer.test / validate: always
