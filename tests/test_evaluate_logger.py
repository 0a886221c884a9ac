"""evaluate.py logger=csv|wandb: the audit's numbers reach the logger, equal to those audit.json holds (read
back independently), and nothing but numbers and settings: no report text, no ids."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _npz(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(150, 16)).astype("float32")
    path = tmp_path / "emb.npz"
    np.savez(path, image_emb=img, report_emb=img + rng.normal(size=img.shape).astype("float32"),
             study_id=np.arange(150), patient_id=np.arange(150) // 2)
    return path


@pytest.mark.parametrize("logger", ["csv", "wandb"])
@pytest.mark.slow
def test_evaluate_logs_the_audit_numbers(tmp_path, logger, monkeypatch):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb.init in this process starts a wandb-core service and advertises it in WANDB_SERVICE, which every
    # later subprocess (train.py in other tests) would then join: the variable goes when this test ends.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    out = tmp_path / "out"
    try:
        evaluate(compose("evaluate.yaml", [f"embeddings={_npz(tmp_path)}", f"logger={logger}",
                                           "audit.relinkage.n_boot=20", f"paths.output_dir={out}"]))
    finally:
        if logger == "wandb":
            import wandb

            wandb.teardown()
    res = json.loads((out / "audit.json").read_text())
    row = next(r for r in res["relinkage"]["i2t"]["recall"] if r["k"] == 1 and r["n"] == "100")
    if logger == "csv":
        (metrics,) = out.rglob("metrics.csv")
        logged = {k: v for r in csv.DictReader(metrics.open()) for k, v in r.items() if v not in ("", None)}
    else:  # the offline run's transaction log, read by tests/test_sweeps.py's independent reader
        from tests.test_sweeps import _item_key, read_wandb_log

        (path,) = out.rglob("offline-run-*/run-*.wandb")
        records = read_wandb_log(path)
        logged = {_item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
                  for i in r.history.item}
    assert float(logged["audit/i2t/R@1/N=100"]) == pytest.approx(row["value"], abs=1e-9)
    assert float(logged["audit/i2t/mrr"]) == pytest.approx(res["relinkage"]["i2t"]["rank"]["mrr"], abs=1e-9)
    # numbers only: every logged metric parses as a float (W&B adds its own _runtime/_step/_timestamp)
    for k, v in logged.items():
        if not k.startswith("_"):
            float(v)
