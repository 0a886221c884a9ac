"""One helper builds the final audit bundle (issue #30 item 3): audit.bundle.final_bundle is what
train.py's final audit and evaluate.py both end with, and callback_sections puts the callbacks' results
together the same way for both."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxr_relink.audit import bundle
from cxr_relink.audit import result as R
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.probe import Probe
from cxr_relink.audit.relinkage import Relinkage


def _callback_results():
    """What RelinkageAudit and LinearProbe keep in last_result (audit.result.build_result dicts)."""
    rng = np.random.default_rng(0)
    n = 40
    img = rng.normal(size=(n, 8)).astype(np.float32)
    rep = img + rng.normal(size=(n, 8)).astype(np.float32)
    labels = (rng.random((n, 14)) < 0.5).astype(np.float32)
    ids = np.arange(n)
    es = EmbeddingSet.from_items(img, rep, ids, ids // 2, labels)
    rel = Relinkage(ns=[10, "full"], n_boot=0, hardneg=False, dedup=False)
    probe = Probe(n_boot=0, eval_labels=["Cardiomegaly", "Edema"])
    meta = {"model": "M", "split": "test", "epoch": 3}
    return [
        R.build_result(relinkage=rel.audit(es), meta={**meta, "n_items": n, "skipped": {"dedup/i2t": "no hashes"}},
                       settings=rel.settings),
        R.build_result(probe=probe.probe(img, labels, img, labels, ids // 2), meta={**meta, "n_padding_duplicates_dropped": 0},
                       settings=probe.settings),
        R.build_result(meta={**meta, "skipped": {"report_quality": "why not"}}, settings={"database": "train"}),
    ]


def test_callback_sections_puts_the_callbacks_results_together():
    results = _callback_results()
    sec = bundle.callback_sections(results)
    assert sec["relinkage"] == results[0]["relinkage"] and sec["probe"] == results[1]["probe"]
    assert sec["report_quality"] is None
    assert sec["settings"] == {"relinkage": results[0]["settings"], "probe": results[1]["settings"]}
    assert sec["skipped"] == {"dedup/i2t": "no hashes", "report_quality": "why not"}
    assert sec["meta"] == results[0]["meta"] and sec["meta"] is not results[0]["meta"]  # a copy
    only_probe = bundle.callback_sections(results[1:2])
    assert only_probe["relinkage"] is None and only_probe["meta"] == results[1]["meta"]
    assert only_probe["settings"] == {"relinkage": None, "probe": results[1]["settings"]}
    assert bundle.callback_sections([])["meta"] == {}


@pytest.fixture
def calls(monkeypatch):
    """Every final_bundle call (the real one runs)."""
    seen = []
    real = bundle.final_bundle

    def spy(out_dir, meta, settings, **kw):
        res = real(out_dir, meta, settings, **kw)
        seen.append((Path(out_dir), res))
        return res

    monkeypatch.setattr(bundle, "final_bundle", spy)
    return seen


def test_train_final_audit_writes_through_final_bundle(tmp_path, calls):
    from omegaconf import OmegaConf

    from train import final_audit

    results = _callback_results()
    callbacks = [SimpleNamespace(last_result=r) for r in results]
    trainer = SimpleNamespace(test=lambda *a, **k: None, callback_metrics={"test/x": 1.0, "val/y": 2.0},
                              is_global_zero=True, checkpoint_callback=None, datamodule=None)
    model = SimpleNamespace(dp_state=lambda: {"enabled": False, "guarantee_valid": False})
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    assert final_audit(cfg, trainer, model, None, callbacks, []) == {"test/x": 1.0}
    ((out, res),) = calls
    assert out == tmp_path / "final_audit"
    written = json.loads((out / "audit.json").read_text())
    assert written["relinkage"] == res["relinkage"] == results[0]["relinkage"] and "probe" in written
    assert written["meta"]["checkpoint_selection"] == "last epoch"
    assert written["meta"]["skipped"] == {"dedup/i2t": "no hashes", "report_quality": "why not"}
    assert written["privacy"]["enabled"] is False and (out / "report.md").exists()


def test_evaluate_writes_through_final_bundle(tmp_path, calls):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    rng = np.random.default_rng(1)
    n = 30
    img = rng.normal(size=(n, 8)).astype(np.float32)
    np.savez(tmp_path / "emb.npz", image_emb=img, report_emb=img + rng.normal(size=(n, 8)).astype(np.float32),
             study_id=np.arange(n), patient_id=np.arange(n) // 2)
    out = tmp_path / "out"
    _, objects = evaluate(compose("evaluate.yaml", [f"embeddings={tmp_path / 'emb.npz'}", f"paths.output_dir={out}",
                                                    "audit=standard", "audit.relinkage.n_boot=0",
                                                    "audit.relinkage.hardneg=false", "audit.relinkage.dedup=false"]))
    ((where, res),) = calls
    assert where == out and res is objects["result"] and (out / "audit.json").exists()
    assert res["meta"]["source"] == "embeddings" and res["settings"]["audit"]["relinkage"]["n_boot"] == 0
